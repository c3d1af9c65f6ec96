/**
 * How the failures of generation appear in the OpenAI API: each scheduler or engine error as the API
 * error (src/api/errors.ts) a client gets for it.
 */
import { type ApiError, BadRequest, GatewayTimeout, InternalError, ServiceUnavailable } from "../api/errors.js"
import type { EngineError } from "../engine/errors.js"
import type { GenerationError } from "../scheduler/Scheduler.js"

/** The API error a scheduler or engine failure stands for. */
export const fromGenerationError = (error: GenerationError | EngineError): ApiError => {
  switch (error._tag) {
    case "InvalidRequestError":
      return new BadRequest({ message: error.message, param: error.param ?? null })
    case "QueueFull":
      return new ServiceUnavailable({
        message: error.message,
        code: "queue_full",
        retryAfterSeconds: error.retryAfterSeconds
      })
    case "Draining":
      return new ServiceUnavailable({ message: error.message, code: "draining" })
    case "RequestTimeout":
      return new GatewayTimeout({ message: error.message, code: "timeout" })
    case "ModelLoadError":
      return new ServiceUnavailable({ message: error.message, code: "model_not_loaded" })
    case "EngineFailure":
      // Out of memory (a KV cache beyond what is left of the budget, an allocation refused) is the
      // server's capacity, not a fault: the client may retry.
      return error.code === "VDIFF_OUT_OF_MEMORY"
        ? new ServiceUnavailable({ message: error.message, code: "out_of_memory" })
        : new InternalError({ message: error.message, code: error.code.toLowerCase() })
  }
}
