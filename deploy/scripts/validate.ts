/**
 * Validates rendered Kubernetes manifests against their schemas, offline:
 *  - Kubernetes' own kinds against the OpenAPI schemas of the `kubernetes-models` package (types,
 *    required fields, enums, formats; like the API server, they do not reject unknown fields);
 *  - the Prometheus Operator's ServiceMonitor against its CRD schema (`@kubernetes-models/prometheus-operator`);
 *  - KServe's ServingRuntime (serving.kserve.io/v1alpha1) and InferenceService (v1beta1), for which no
 *    package has schemas, against the JSON schemas below: the part of KServe's API these manifests use,
 *    written from its Go types (pkg/apis/serving), closed (unknown fields are errors), with every
 *    embedded Kubernetes type (Container, Toleration, ResourceRequirements, EnvVar) checked by
 *    kubernetes-models' schema for it.
 * A manifest of any other apiVersion/kind is an error: nothing passes unchecked (a new API group is added
 * to `modules` below).
 *
 *   node --import tsx deploy/scripts/validate.ts deploy/kubernetes/overlays/gpu   (renders, then validates)
 */
import { resolve } from "node:path"
import { Ajv, type ErrorObject } from "ajv"
import type { Manifest } from "./kustomize.js"
import { render } from "./kustomize.js"

interface Validatable {
  validate(): void
}
type ModelClass = new (data: unknown) => Validatable

/** The schema modules, by apiVersion: the API groups these manifests use. */
const modules: Record<string, () => Promise<Record<string, unknown>>> = {
  v1: () => import("kubernetes-models/v1"),
  "apps/v1": () => import("kubernetes-models/apps/v1"),
  "policy/v1": () => import("kubernetes-models/policy/v1"),
  "autoscaling/v2": () => import("kubernetes-models/autoscaling/v2"),
  "monitoring.coreos.com/v1": () => import("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1")
}

/** Runs a kubernetes-models validator; its message, or undefined when valid. */
const runModel = (Model: ModelClass, value: unknown): string | undefined => {
  try {
    new Model(value).validate()
    return undefined
  } catch (error) {
    return String((error as Error).message ?? error)
  }
}

// --- KServe -------------------------------------------------------------------------------------------

const embeddedKinds = ["Container", "Toleration", "ResourceRequirements", "EnvVar"] as const
let embedded: Record<string, ModelClass> | undefined
const loadEmbedded = async () => {
  embedded ??= (await import("kubernetes-models/v1")) as unknown as Record<string, ModelClass>
}

const stringMap = { type: "object", additionalProperties: { type: "string" } }
const metadata = {
  type: "object",
  required: ["name"],
  additionalProperties: false,
  properties: {
    name: { type: "string", pattern: "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength: 63 },
    namespace: { type: "string" },
    labels: stringMap,
    annotations: stringMap
  }
}
const k8s = (kind: (typeof embeddedKinds)[number]) => ({ k8s: kind })
const list = (items: object) => ({ type: "array", items })

/** serving.kserve.io/v1alpha1 ServingRuntime (ServingRuntimeSpec with its inline ServingRuntimePodSpec). */
const servingRuntimeSchema = {
  type: "object",
  required: ["apiVersion", "kind", "metadata", "spec"],
  additionalProperties: false,
  properties: {
    apiVersion: { const: "serving.kserve.io/v1alpha1" },
    kind: { const: "ServingRuntime" },
    metadata,
    spec: {
      type: "object",
      required: ["containers"],
      additionalProperties: false,
      properties: {
        supportedModelFormats: list({
          type: "object",
          required: ["name"],
          additionalProperties: false,
          properties: {
            name: { type: "string" },
            version: { type: "string" },
            autoSelect: { type: "boolean" },
            priority: { type: "integer", minimum: 1 }
          }
        }),
        multiModel: { type: "boolean" },
        disabled: { type: "boolean" },
        protocolVersions: list({ enum: ["v1", "v2", "grpc-v1", "grpc-v2"] }),
        containers: { ...list(k8s("Container")), minItems: 1 },
        volumes: list({ type: "object" }),
        nodeSelector: stringMap,
        tolerations: list(k8s("Toleration")),
        labels: stringMap,
        annotations: stringMap
      }
    }
  }
}

/** serving.kserve.io/v1beta1 InferenceService with a `model` predictor (PredictorSpec, ComponentExtensionSpec, ModelSpec). */
const inferenceServiceSchema = {
  type: "object",
  required: ["apiVersion", "kind", "metadata", "spec"],
  additionalProperties: false,
  properties: {
    apiVersion: { const: "serving.kserve.io/v1beta1" },
    kind: { const: "InferenceService" },
    metadata,
    spec: {
      type: "object",
      required: ["predictor"],
      additionalProperties: false,
      properties: {
        predictor: {
          type: "object",
          required: ["model"],
          additionalProperties: false,
          properties: {
            minReplicas: { type: "integer", minimum: 0 },
            maxReplicas: { type: "integer", minimum: 0 },
            scaleTarget: { type: "integer" },
            scaleMetric: { enum: ["cpu", "memory", "concurrency", "rps"] },
            containerConcurrency: { type: "integer", minimum: 0 },
            timeout: { type: "integer" },
            canaryTrafficPercent: { type: "integer", minimum: 0, maximum: 100 },
            labels: stringMap,
            annotations: stringMap,
            nodeSelector: stringMap,
            tolerations: list(k8s("Toleration")),
            serviceAccountName: { type: "string" },
            model: {
              type: "object",
              required: ["modelFormat"],
              additionalProperties: false,
              properties: {
                modelFormat: {
                  type: "object",
                  required: ["name"],
                  additionalProperties: false,
                  properties: { name: { type: "string" }, version: { type: "string" } }
                },
                runtime: { type: "string" },
                runtimeVersion: { type: "string" },
                protocolVersion: { enum: ["v1", "v2", "grpc-v1", "grpc-v2"] },
                storageUri: { type: "string", pattern: "^(pvc|s3|gs|hdfs|webhdfs|https?|hf|oci)://" },
                args: list({ type: "string" }),
                env: list(k8s("EnvVar")),
                resources: k8s("ResourceRequirements")
              }
            }
          }
        }
      }
    }
  }
}

const ajv = new Ajv({ allErrors: true, strict: true })
ajv.addKeyword({
  keyword: "k8s",
  schemaType: "string",
  errors: true,
  validate: function check(kind: string, data: unknown) {
    const message = runModel(embedded![kind]!, data)
    if (message === undefined) return true
    ;(check as unknown as { errors: Array<Partial<ErrorObject>> }).errors = [
      { keyword: "k8s", message: `${kind}: ${message}`, params: { kind } }
    ]
    return false
  }
})
const kserve: Record<string, ReturnType<typeof ajv.compile>> = {
  "serving.kserve.io/v1alpha1/ServingRuntime": ajv.compile(servingRuntimeSchema),
  "serving.kserve.io/v1beta1/InferenceService": ajv.compile(inferenceServiceSchema)
}

// --- any manifest -------------------------------------------------------------------------------------

/** Why `manifest` does not validate, or undefined when it does. */
export const validateManifest = async (manifest: Manifest): Promise<string | undefined> => {
  const where = `${manifest?.apiVersion}/${manifest?.kind} ${manifest?.metadata?.name}`
  const custom = kserve[`${manifest?.apiVersion}/${manifest?.kind}`]
  if (custom !== undefined) {
    await loadEmbedded()
    if (custom(manifest)) return undefined
    return `${where}: ${(custom.errors ?? []).map((e) => `${e.instancePath || "/"} ${e.message}`).join("; ")}`
  }
  const load = typeof manifest?.apiVersion === "string" ? modules[manifest.apiVersion] : undefined
  const module = load === undefined ? undefined : await load()
  const Model = module?.[manifest?.kind] as ModelClass | undefined
  if (Model === undefined || typeof Model !== "function") return `${where}: no schema for this apiVersion and kind`
  const message = runModel(Model, manifest)
  return message === undefined ? undefined : `${where}: ${message}`
}

const isMain = process.argv[1] !== undefined && import.meta.filename === resolve(process.argv[1])
if (isMain) {
  let failed = 0
  for (const dir of process.argv.slice(2)) {
    for (const manifest of render(dir)) {
      const problem = await validateManifest(manifest)
      if (problem !== undefined) failed++
      console.log(problem ?? `ok ${dir}: ${manifest.apiVersion}/${manifest.kind} ${manifest.metadata.name}`)
    }
  }
  process.exitCode = failed === 0 ? 0 : 1
}
