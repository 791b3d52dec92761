"""Run examples/paper_cnn.train_run for chosen seeds (the documented 8-seed MNIST-5k comparison, in pieces)."""
import sys, json
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "../../../../examples"))
import torch
torch.set_num_threads(1)
import paper_cnn as pc
ds, opt, lr, epochs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
seeds = [int(s) for s in sys.argv[5].split(",")]
data = pc.load_mnist5k() if ds == "mnist5k" else pc.load_digits32()
mk = lambda: pc.small_model(data[0].shape[1], data[0].shape[-1])
for s in seeds:
    r = pc.train_run(mk, data, opt, lr, epochs, seed=s)
    print(json.dumps({"ds": ds, "opt": opt, "lr": lr, "seed": s, "summed": [round(v, 3) for v in r["summed_loss"]],
                      "test_error": r["test_error"][-1], "step_ms": round(r["step_ms"], 3), "finite": r["finite"]}), flush=True)
