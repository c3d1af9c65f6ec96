/** GET /v1/models and /v1/models/{model}: the one model this server serves. */
import { HttpServerResponse } from "@effect/platform"
import { Effect } from "effect"
import { lladaFamily } from "../config/sampling.js"
import type { Model, ModelList } from "./protocol.js"
import { checkModel } from "./plan.js"
import { ServingConfig } from "./ServingConfig.js"

const servedModel = Effect.map(ServingConfig, (config): Model => {
  const family = config.family ?? lladaFamily
  return {
    id: config.modelName,
    object: "model",
    created: config.created,
    owned_by: "vdiff",
    max_model_len: config.maxModelLen,
    // LLaDA's model object stays as it was; the other families name themselves.
    ...(family.name === lladaFamily.name && family.decoding === "full_canvas"
      ? {}
      : {
          family: { name: family.name, decoding: family.decoding, block_length: family.blockLength, editing: family.editing }
        })
  }
})

export const listModels = Effect.map(servedModel, (model) =>
  HttpServerResponse.unsafeJson({ object: "list", data: [model] } satisfies ModelList)
)

export const retrieveModel = (name: string) =>
  Effect.zipRight(
    checkModel(name),
    Effect.map(servedModel, (model) => HttpServerResponse.unsafeJson(model))
  )
