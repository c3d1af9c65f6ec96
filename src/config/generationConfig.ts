/**
 * A model directory's generation_config.json (Hugging Face's file of recommended sampling defaults), read
 * as `vdiff serve --generation-config auto` and `vdiff generate` lay it under their own defaults.
 */
import { existsSync, readFileSync } from "node:fs"
import { join } from "node:path"
import { Either } from "effect"
import * as Sampling from "./sampling.js"

/** The file's name in a model directory. */
export const GENERATION_CONFIG = "generation_config.json"

/**
 * The sampling defaults the directory's file recommends for the model's family (Sampling.modelDefaults):
 * none when there is no file; a message naming the file when it is not JSON or holds a value out of range.
 */
export const readModelDefaults = (modelDir: string, family: Sampling.ModelFamily): Either.Either<Sampling.ModelDefaults, string> => {
  const path = join(modelDir, GENERATION_CONFIG)
  if (!existsSync(path)) return Either.right({})
  let json: unknown
  try {
    json = JSON.parse(readFileSync(path, "utf8"))
  } catch (cause) {
    return Either.left(`${GENERATION_CONFIG}: ${String(cause)}`)
  }
  return Either.mapLeft(Sampling.modelDefaults(json, family), (message) => `${GENERATION_CONFIG}: ${message}`)
}
