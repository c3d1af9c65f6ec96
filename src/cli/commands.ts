/**
 * The settings tables of the `vdiff` tools (make-model, generate), on the same mechanism as `vdiff serve`
 * (src/config/Setting.ts): one parser, and `--help` generated from the table. They read flags only, no
 * environment variables.
 */
import { Schema } from "effect"
import { cpuIsas } from "../config/Config.js"
import { samplingSettings } from "../config/sampling.js"
import { familyPresets, presets } from "../model/presets.js"
import { commandLine, IntegerText, NonEmptyText, NumberText, OneOfText, setting } from "../config/Setting.js"

const optionalText = (description: string, value: string) =>
  setting(Schema.UndefinedOr(NonEmptyText), { description, default: undefined, defaultText: "", value })

export const makeModel = commandLine(
  Schema.Struct({
    preset: optionalText(
      `Preset to build with random weights: ${[...Object.keys(presets), ...Object.keys(familyPresets)].join(", ")} (or --from-raw)`,
      "NAME"
    ),
    fromRaw: optionalText("Directory of raw f32 tensors to import instead of a preset", "DIR"),
    seed: setting(IntegerText(0), { description: "Seed of the random weights", default: "0", value: "N" }),
    out: optionalText("Directory to write the model to (required)", "DIR"),
    dtype: optionalText("Element type of the weights written: f32, bf16 or f16 (default: the preset's)", "f32|bf16|f16"),
    shardMb: setting(Schema.UndefinedOr(NumberText(0, true)), {
      description: "Largest safetensors shard, in MB; larger models are split (default: one file)",
      default: undefined,
      defaultText: "",
      value: "MB"
    }),
    quantize: setting(OneOfText(["none", "q8_0", "q4_0"]), {
      description: "Write the preset's matrices block-quantized (as vdiff quantize would), tensor by tensor",
      default: "none",
      value: "none|q8_0|q4_0"
    })
  }),
  { command: "vdiff make-model", environment: false, summary: ["Writes a model directory (config.json, safetensors, tokenizer)."] }
)

export const generate = commandLine(
  Schema.Struct({
    model: optionalText("Model directory (required)", "DIR"),
    promptIds: optionalText("Prompt as comma-separated token ids (required)", "1,2,3"),
    prompt: optionalText("Prompt as text (not supported: pass --prompt-ids)", "TEXT"),
    genLength: setting(IntegerText(1), { description: "Answer length in tokens", default: "128", value: "N", flag: "--gen" }),
    blockLength: setting(Schema.UndefinedOr(IntegerText(1)), {
      description: "Block length (default: the model family's, as vdiff serve gives it: 32, the model's trained block, or none for Dream)",
      default: undefined,
      defaultText: "",
      value: "N",
      flag: "--block"
    }),
    steps: setting(Schema.UndefinedOr(IntegerText(1)), {
      description:
        "Denoising steps over the whole answer, as a request's diffusion_steps (default: one per answer token; block models: per block)",
      default: undefined,
      defaultText: "",
      value: "N"
    }),
    // The request's bounds (src/config/sampling.ts).
    temperature: setting(NumberText(0, false, samplingSettings.temperature.value.max), {
      description: "Sampling temperature; 0 is greedy",
      default: "0",
      value: "T"
    }),
    cfgScale: setting(Schema.UndefinedOr(NumberText(0, false, samplingSettings.cfg_scale.value.max)), {
      description: "Classifier-free guidance scale; 0 turns it off (LLaDA only)",
      default: undefined,
      defaultText: "",
      value: "S",
      flag: "--cfg"
    }),
    remasking: setting(Schema.UndefinedOr(OneOfText(samplingSettings.remasking.value.values)), {
      description: "Which masked positions a step commits (LLaDA only; default low_confidence)",
      default: undefined,
      defaultText: "",
      value: samplingSettings.remasking.value.values.join("|")
    }),
    seed: setting(IntegerText(0), { description: "Seed of the sequence's random stream", default: "0", value: "N" }),
    threads: setting(IntegerText(0, 4096), { description: "Forward-pass threads; 0 uses every core", default: "0", value: "N" }),
    device: setting(OneOfText(["auto", "cpu", "cuda"]), { description: "Where the forward runs", default: "cpu", value: "auto|cpu|cuda" }),
    quantize: setting(OneOfText(["none", "q8_0", "q4_0"]), {
      description: "Quantize the matrices at load (CPU): q8_0 or q4_0 blocks of 32; none keeps them as stored",
      default: "none",
      value: "none|q8_0|q4_0"
    }),
    cpuIsa: setting(OneOfText(cpuIsas), {
      description: "Instruction set of the CPU kernels: auto (the widest this CPU has) or one to force",
      default: "auto",
      value: "auto|portable|avx2|avx512|avx512bf16|amx"
    })
  }),
  {
    command: "vdiff generate",
    environment: false,
    summary: ["One generation from token ids straight through the native engine, timed; prints JSON."]
  }
)

export const quantize = commandLine(
  Schema.Struct({
    model: optionalText("Model directory to quantize (required)", "DIR"),
    out: optionalText("Directory to write the quantized model to (required)", "DIR"),
    format: setting(OneOfText(["q8_0", "q4_0"]), {
      description: "Block format of the projection matrices (the head stays as stored): int8 or 4-bit, 32 per f16 scale",
      default: "q8_0",
      value: "q8_0|q4_0"
    })
  }),
  {
    command: "vdiff quantize",
    environment: false,
    summary: ["Writes a copy of a model with its matrices block-quantized (src/model/quantize.ts), streaming."]
  }
)
