import json, statistics as st, sys
def load(f): return {r["seed"]: r for r in map(json.loads, open(f))}
ada = load("ada.jsonl"); bm = {**load("bmt_a.jsonl"), **load("bmt_b.jsonl")}
seeds = sorted(set(ada) & set(bm))
a = [ada[s]["summed"][-1] for s in seeds]; b = [bm[s]["summed"][-1] for s in seeds]
print("seeds", seeds)
print("adagrad final summed", [round(x,2) for x in a], f"mean {st.mean(a):.2f} ± {st.stdev(a):.2f}", "test err", round(st.mean(ada[s]['test_error'] for s in seeds),3))
print("bm tensor final summed", [round(x,2) for x in b], f"mean {st.mean(b):.2f} ± {st.stdev(b):.2f}", "test err", round(st.mean(bm[s]['test_error'] for s in seeds),3))
d = [x - y for x, y in zip(a, b)]
print(f"bm below adagrad in {sum(x>0 for x in d)}/{len(d)}; paired diff {st.mean(d):.2f} ± SE {st.stdev(d)/len(d)**0.5:.2f}")
for ep in (0, 1, 4, 9):
    print("epoch", ep+1, "ada", round(st.mean(ada[s]["summed"][ep] for s in seeds),2), "bm", round(st.mean(bm[s]["summed"][ep] for s in seeds),2))
