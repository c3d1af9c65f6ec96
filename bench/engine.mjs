#!/usr/bin/env node
// Engine benchmark: vdiff's native engine against the PyTorch reference on the same random models.
//
//   npm run bench [-- --models tiny,small,small-bf16 --batch 1,8 --gen 128 --block 32 --steps 128
//                     --prompt-len 32 --threads 2 --no-torch --json results.json --keep DIR]
//
// Makes the models with `vdiff make-model` in a temporary directory (tiny and small in f32, so both
// implementations compute in f32 on identical weights; small also in bf16, vdiff only: the reference
// upcasts bf16 to f32 at load, so timing it would measure the same thing twice), then for each model runs
//   build/native/vdiff-cli bench   (forward latency over the whole canvas, denoising tokens/s per batch)
//   tools/reference/bench.py       (the same two numbers for PyTorch; only when /usr/bin/python3 has torch)
// and prints a table. "speedup" is vdiff over PyTorch: PyTorch ms / vdiff ms for the forward, vdiff tokens/s
// / PyTorch tokens/s for denoising; above 1 means vdiff is faster.
//
// The defaults (prompt 32 + gen 128, 128 steps, batches 1 and 8) take several minutes for `small` on two
// cores: every step is a full forward over every sequence of the batch.
import { spawnSync } from "node:child_process"
import { existsSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fixed, flags, log, makeModel as makeModelDir, report, root, run, runMain, table } from "./lib.mjs"

const cli = join(root, "build", "native", "vdiff-cli")
const python = "/usr/bin/python3"

const opts = flags({
  models: "tiny,small,small-bf16",
  batch: "1,8",
  gen: "128",
  block: "32",
  steps: "128",
  "prompt-len": "32",
  threads: "2",
  seed: "1",
  "no-torch": false,
  json: undefined,
  keep: undefined
})

// name → how to make it, and whether the PyTorch reference runs on it too.
const modelSpecs = {
  tiny: { preset: "tiny", dtype: "f32", torch: true },
  small: { preset: "small", dtype: "f32", torch: true },
  "small-bf16": { preset: "small", dtype: "bf16", torch: false },
  // Dream's layout at small's size (q/k/v biases, shifted logits, Dream's decoding): the family comparison.
  // The PyTorch bench script runs LLaDA only.
  "dream-small": { preset: "dream-small", dtype: "f32", torch: false }
}

const hasTorch = () => {
  if (opts["no-torch"] || !existsSync(python)) return false
  return spawnSync(python, ["-c", "import torch"], { stdio: "ignore" }).status === 0
}

const makeModel = (workdir, name) => {
  const spec = modelSpecs[name]
  if (spec === undefined) throw new Error(`unknown model "${name}" (known: ${Object.keys(modelSpecs).join(", ")})`)
  const out = join(workdir, name)
  const started = Date.now()
  makeModelDir({ preset: spec.preset, seed: opts.seed, out, dtype: spec.dtype })
  log(`made ${name} (${spec.preset}, ${spec.dtype}) in ${((Date.now() - started) / 1000).toFixed(1)} s`)
  return out
}

const benchVdiff = (dir) =>
  JSON.parse(
    run(cli, [
      "bench",
      "--model",
      dir,
      "--prompt-len",
      opts["prompt-len"],
      "--gen",
      opts.gen,
      "--block",
      opts.block,
      "--steps",
      opts.steps,
      "--batch",
      opts.batch,
      "--threads",
      opts.threads
    ])
  )

const benchTorch = (dir) =>
  JSON.parse(
    run(python, [
      join(root, "tools", "reference", "bench.py"),
      dir,
      "--threads",
      opts.threads,
      "--seq-len",
      String(Number(opts["prompt-len"]) + Number(opts.gen)),
      "--prompt-length",
      opts["prompt-len"],
      "--gen-length",
      opts.gen,
      "--block-length",
      opts.block,
      "--steps",
      opts.steps,
      "--batches",
      opts.batch
    ])
  )

const main = () => {
  if (!existsSync(cli)) throw new Error(`${cli} not found: run npm run build:native first`)
  const batches = opts.batch.split(",").map(Number)
  const torch = hasTorch()
  if (!torch) log("PyTorch reference skipped (--no-torch, or /usr/bin/python3 has no torch)")
  const workdir = opts.keep ?? mkdtempSync(join(tmpdir(), "vdiff-bench-"))
  const results = []
  try {
    for (const name of opts.models.split(",")) {
      const dir = makeModel(workdir, name)
      log(`vdiff-cli bench ${name} ...`)
      const vdiff = benchVdiff(dir)
      let reference = null
      if (torch && modelSpecs[name].torch) {
        log(`PyTorch reference bench ${name} ...`)
        reference = benchTorch(dir)
      }
      results.push({ model: name, dtype: modelSpecs[name].dtype, vdiff, reference })
    }
  } finally {
    if (opts.keep === undefined) rmSync(workdir, { recursive: true, force: true })
  }

  const header = ["model", "impl", `forward ms (${Number(opts["prompt-len"]) + Number(opts.gen)} tok)`]
  for (const b of batches) header.push(`tok/s b=${b}`)
  const rows = [header]
  for (const r of results) {
    const tokensPerS = (list, b) => list?.find((d) => d.batch === b)?.tokens_per_s
    const vdiffRow = [`${r.model}`, `vdiff ${r.vdiff.weight_dtype}`, fixed(r.vdiff.forward_ms.all_rows.median, 2)]
    for (const b of batches) vdiffRow.push(fixed(tokensPerS(r.vdiff.denoise, b)))
    rows.push(vdiffRow)
    if (r.reference !== null) {
      const torchRow = ["", "pytorch f32", fixed(r.reference.forward.median_ms, 2)]
      for (const b of batches) torchRow.push(fixed(tokensPerS(r.reference.generate, b)))
      rows.push(torchRow)
      const speedup = ["", "speedup", `${fixed(r.reference.forward.median_ms / r.vdiff.forward_ms.all_rows.median, 2)}x`]
      for (const b of batches) speedup.push(`${fixed(tokensPerS(r.vdiff.denoise, b) / tokensPerS(r.reference.generate, b), 2)}x`)
      rows.push(speedup)
    }
  }
  const threads = results[0]?.vdiff.threads
  report(
    `prompt ${opts["prompt-len"]}, gen ${opts.gen}, block ${opts.block}, steps ${opts.steps}, threads ${threads}` +
      ` (forward: one pass over the whole canvas, logits for every row; tok/s: answer tokens per second of denoising)\n\n` +
      table(rows) +
      "\n",
    opts.json,
    results
  )
}

runMain(main)
