"""Joins the two sides of the GPU benchmark (bench/gpu/run.sh) into gpu-<date>.json and prints the table with
the targets of issue 15:
  1x160 step <= 5.5 ms; vanilla >= 1.3x PyTorch; dual cache + threshold >= 2x PyTorch on the same algorithm;
  32x160 at >= 60% of the measured bf16 matmul rate.
"""
import argparse
import json
import re


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # a side that failed still gets its row in the table
        return {"error": f"{path}: {e}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch", required=True)
    ap.add_argument("--vdiff", required=True)
    ap.add_argument("--tests")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t, v = load(a.torch), load(a.vdiff)
    out = {"machine": t.get("device"), "torch": t, "vdiff": v, "targets": {}}
    if a.tests:
        with open(a.tests) as f:
            text = f.read()
        m = re.search(r"(\d+) checks, (\d+) failures", text)
        out["cuda_tests"] = {"checks": int(m.group(1)), "failures": int(m.group(2))} if m else {"summary": "missing"}
        out["cuda_tests"]["failed"] = [line for line in text.splitlines() if line.startswith("FAIL")]
    rows = []
    matmul = t.get("ceilings", {}).get("bf16_matmul_tflops")
    for tf, vf in zip(t.get("forward", []), v.get("forward", [])):
        shape = f'{tf["batch"]}x{tf["length"]}'
        rows.append((f"step {shape} (ms, median)", vf["median_ms"], tf["median_ms"], tf["median_ms"] / vf["median_ms"]))
        if shape == "1x160":
            out["targets"]["1x160 <= 5.5 ms"] = vf["median_ms"] <= 5.5
        if shape == "32x160" and matmul:
            share = vf["tflops"] / matmul
            out["targets"]["32x160 >= 60% of the bf16 matmul rate"] = share >= 0.6
            out["vdiff_32x160_share_of_matmul"] = round(share, 3)
    tg, vg = t.get("generate", {}), v.get("generate", {})
    for name, target in [("vanilla", 1.3), ("dual_threshold", 2.0)]:
        if name in tg and name in vg:
            ratio = vg[name]["tokens_per_s"] / tg[name]["tokens_per_s"]
            rows.append((f"{name} (tok/s)", vg[name]["tokens_per_s"], tg[name]["tokens_per_s"], ratio))
            out["targets"][f"{name} >= {target}x PyTorch"] = ratio >= target
            same = sum(x == y for x, y in zip(vg[name]["answer"], tg[name]["answer"]))
            out[f"{name}_answer_agreement"] = f"{same} of {len(tg[name]['answer'])}"
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"machine: {out['machine']}; ceilings: {t.get('ceilings')}; vdiff: {v.get('backend')}")
    print(f"{'':32} {'vdiff':>10} {'PyTorch':>10} {'speedup':>8}")
    for name, x, y, r in rows:
        print(f"{name:32} {x:10.2f} {y:10.2f} {r:8.2f}")
    for k in ("vanilla_answer_agreement", "dual_threshold_answer_agreement", "vdiff_32x160_share_of_matmul", "cuda_tests"):
        if k in out:
            print(f"{k}: {out[k]}")
    for vf in v.get("forward", []):
        if vf.get("profile"):
            ms = vf["profile"]["ms"]
            top = sorted(ms.items(), key=lambda kv: -kv[1])[:6]
            print(f'vdiff {vf["batch"]}x{vf["length"]} per step: ' + ", ".join(f"{k} {x:.3f}" for k, x in top) + " ms")
    for k, ok in out["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
