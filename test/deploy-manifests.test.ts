/**
 * deploy/kubernetes: every manifest of every rendering (overlays cpu and gpu, kserve, prometheus-adapter)
 * validates against its schema (deploy/scripts/validate.ts), and invalid ones do not (negative controls);
 * the renderer agrees with `kubectl kustomize` where kubectl is installed; and the manifests fit together
 * and fit vdiff: probes on the server's health routes, a drain deadline shorter than the grace period,
 * every VDIFF_* value accepted by the server's own settings parser, selectors that select, the HPA's
 * metric served by the adapter's rule from a metric vdiff exports.
 */
import { execFileSync } from "node:child_process"
import { join } from "node:path"
import { Effect, Either, Metric } from "effect"
import { describe, expect, it } from "vitest"
import { parse as parseYaml, parseAllDocuments } from "yaml"
import { applyJsonPatch, type Manifest, render } from "../deploy/scripts/kustomize.js"
import { validateManifest } from "../deploy/scripts/validate.js"
import * as Config from "../src/config/Config.js"
import * as Metrics from "../src/telemetry/metrics.js"
import * as Telemetry from "../src/telemetry/Telemetry.js"

const root = join(import.meta.dirname, "..", "deploy", "kubernetes")
const renderings = ["overlays/cpu", "overlays/gpu", "kserve", "prometheus-adapter"] as const
const rendered = Object.fromEntries(renderings.map((dir) => [dir, render(join(root, dir))])) as Record<
  (typeof renderings)[number],
  Array<Manifest>
>

const kubectl = (() => {
  try {
    execFileSync("kubectl", ["version", "--client"], { stdio: "ignore" })
    return true
  } catch {
    return false
  }
})()

const find = (manifests: ReadonlyArray<Manifest>, kind: string): any => {
  const found = manifests.filter((m) => m.kind === kind)
  expect(found.length, kind).toBe(1)
  return found[0]
}

/** The server's flush grace after the drain (Server.ts flushGraceMs), in seconds. */
const flushGraceS = 5

const selects = (selector: Record<string, string>, labels: Record<string, string>) =>
  Object.entries(selector).every(([key, value]) => labels[key] === value)

/** The VDIFF_* settings as `vdiff serve` would load them: its own parser decides. */
const loadSettings = (env: Record<string, string>) => {
  for (const name of Object.keys(env))
    expect(
      Config.settings.map((s) => s.env),
      `${name} is a vdiff setting`
    ).toContain(name)
  const loaded = Config.load({ argv: [], env })
  if (Either.isLeft(loaded)) throw new Error(loaded.left.message)
  return loaded.right
}

describe("deploy/kubernetes", () => {
  it("every rendered manifest validates against its schema", async () => {
    let count = 0
    for (const dir of renderings) {
      expect(rendered[dir].length, dir).toBeGreaterThan(0)
      for (const manifest of rendered[dir]) {
        expect(await validateManifest(manifest), `${dir}: ${manifest.kind} ${manifest.metadata.name}`).toBeUndefined()
        count++
      }
    }
    // 6 + 6 (overlays) + 2 (KServe) + 1 (adapter rule)
    expect(count).toBe(15)
  })

  it("invalid manifests fail validation (negative controls)", async () => {
    const deployment = find(rendered["overlays/gpu"], "Deployment")
    const hpa = find(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
    const monitor = find(rendered["overlays/gpu"], "ServiceMonitor")
    const service = find(rendered["overlays/gpu"], "Service")
    const runtime = find(rendered.kserve, "ServingRuntime")
    const isvc = find(rendered.kserve, "InferenceService")
    // Each fails, and for the reason it was broken for.
    const broken: Array<[string, Manifest, string]> = [
      [
        "container port as text",
        applyJsonPatch(deployment, [{ op: "replace", path: "/spec/template/spec/containers/0/ports/0/containerPort", value: "http" }]),
        "containerPort must be integer"
      ],
      [
        "container without a name",
        applyJsonPatch(deployment, [{ op: "remove", path: "/spec/template/spec/containers/0/name" }]),
        "must have required property name"
      ],
      [
        "deployment without a selector",
        applyJsonPatch(deployment, [{ op: "remove", path: "/spec/selector" }]),
        "must have required property selector"
      ],
      [
        "probe port as a list",
        applyJsonPatch(deployment, [{ op: "replace", path: "/spec/template/spec/containers/0/livenessProbe/httpGet/port", value: [8000] }]),
        "httpGet/port must be"
      ],
      [
        "HPA without maxReplicas",
        applyJsonPatch(hpa, [{ op: "remove", path: "/spec/maxReplicas" }]),
        "must have required property maxReplicas"
      ],
      [
        "HPA metric without its type",
        applyJsonPatch(hpa, [{ op: "remove", path: "/spec/metrics/0/type" }]),
        "metrics/0 must have required property type"
      ],
      [
        "service port as text",
        applyJsonPatch(service, [{ op: "replace", path: "/spec/ports/0/port", value: "eighty" }]),
        "ports/0/port must be integer"
      ],
      [
        "ServiceMonitor endpoints not a list",
        applyJsonPatch(monitor, [{ op: "replace", path: "/spec/endpoints", value: { port: "http" } }]),
        "endpoints must be array"
      ],
      [
        "ServiceMonitor scheme unknown",
        applyJsonPatch(monitor, [{ op: "add", path: "/spec/endpoints/0/scheme", value: "gopher" }]),
        "scheme must be equal to one of the allowed values"
      ],
      [
        "ServingRuntime field unknown to KServe",
        applyJsonPatch(runtime, [{ op: "add", path: "/spec/gpus", value: 1 }]),
        "/spec must NOT have additional properties"
      ],
      [
        "ServingRuntime without containers",
        applyJsonPatch(runtime, [{ op: "replace", path: "/spec/containers", value: [] }]),
        "containers must NOT have fewer than 1 items"
      ],
      [
        "ServingRuntime container with a bad env entry",
        applyJsonPatch(runtime, [{ op: "add", path: "/spec/containers/0/env/0/value", value: 8080 }]),
        "Container: data/env/0/value must be string"
      ],
      [
        "InferenceService without modelFormat",
        applyJsonPatch(isvc, [{ op: "remove", path: "/spec/predictor/model/modelFormat" }]),
        "must have required property 'modelFormat'"
      ],
      [
        "InferenceService scaleMetric unknown",
        applyJsonPatch(isvc, [{ op: "replace", path: "/spec/predictor/scaleMetric", value: "queue" }]),
        "scaleMetric must be equal to one of the allowed values"
      ],
      [
        "InferenceService GPU count as a list",
        applyJsonPatch(isvc, [{ op: "replace", path: "/spec/predictor/model/resources/limits", value: { "nvidia.com/gpu": [1] } }]),
        "ResourceRequirements: data/limits/nvidia.com~1gpu must be"
      ],
      [
        "an unknown kind",
        { apiVersion: "example.com/v1", kind: "Widget", metadata: { name: "w" } },
        "no schema for this apiVersion and kind"
      ],
      ["a kind at the wrong version", { ...deployment, apiVersion: "apps/v1beta9" }, "no schema for this apiVersion and kind"]
    ]
    for (const [what, manifest, why] of broken) expect(await validateManifest(manifest), what).toContain(why)
  })

  it.skipIf(!kubectl)("the renderer agrees with kubectl kustomize", () => {
    const key = (m: Manifest) => `${m.kind}/${m.metadata.name}`
    for (const dir of renderings) {
      const output = execFileSync("kubectl", ["kustomize", join(root, dir)], { encoding: "utf8" })
      const theirs = parseAllDocuments(output).map((d) => d.toJS() as Manifest)
      const ours = rendered[dir]
      expect(theirs.map(key).sort(), dir).toEqual(ours.map(key).sort())
      for (const manifest of ours)
        expect(
          theirs.find((m) => key(m) === key(manifest)),
          `${dir} ${key(manifest)}`
        ).toEqual(manifest)
    }
  })

  for (const overlay of ["overlays/cpu", "overlays/gpu"] as const) {
    it(`${overlay}: probes, drain deadline, settings, selectors`, () => {
      const manifests = rendered[overlay]
      const deployment = find(manifests, "Deployment")
      const config = find(manifests, "ConfigMap")
      const pod = deployment.spec.template
      const container = pod.spec.containers[0]
      const settings = loadSettings(config.data)
      expect(container.envFrom).toEqual([{ configMapRef: { name: config.metadata.name } }])

      // Probes on the server's routes, on its port.
      const port = container.ports.find((p: any) => p.name === "http")
      expect(port.containerPort).toBe(settings.port)
      expect(settings.host).toBe("0.0.0.0")
      expect(container.startupProbe.httpGet).toEqual({ path: "/health/ready", port: "http" })
      expect(container.livenessProbe.httpGet).toEqual({ path: "/health/live", port: "http" })
      expect(container.readinessProbe.httpGet).toEqual({ path: "/health/ready", port: "http" })
      // Model load gets minutes; liveness never kills a busy server in under 30 s.
      expect(container.startupProbe.periodSeconds * container.startupProbe.failureThreshold).toBeGreaterThanOrEqual(600)
      expect(container.livenessProbe.periodSeconds * container.livenessProbe.failureThreshold).toBeGreaterThanOrEqual(30)

      // The grace period covers preStop, the drain deadline and the flush that follows it.
      const preStop = container.lifecycle.preStop.exec.command
      expect(preStop[0]).toBe("sleep")
      const deadline = Number(preStop[1]) + settings.shutdownTimeout + flushGraceS
      expect(pod.spec.terminationGracePeriodSeconds).toBeGreaterThan(deadline)
      expect(deployment.spec.strategy.rollingUpdate.maxUnavailable).toBe(0)

      // Resources; a GPU on the GPU variant only.
      expect(container.resources.requests.cpu).toBeDefined()
      expect(container.resources.requests.memory).toBeDefined()
      expect(container.resources.limits.memory).toBeDefined()
      const gpu = container.resources.limits["nvidia.com/gpu"]
      if (overlay === "overlays/gpu") {
        expect(gpu).toBe("1")
        expect(settings.device).toBe("cuda")
        expect(container.image).toBe("vdiff:cuda")
        expect(settings.model).toBe("/models/model")
        expect(container.volumeMounts.find((v: any) => v.mountPath === "/models")?.readOnly).toBe(true)
      } else {
        expect(gpu).toBeUndefined()
        expect(settings.device).toBe("cpu")
        expect(container.image).toBe("vdiff:cpu")
        // The image's own model: no model volume.
        expect(pod.spec.volumes.map((v: any) => v.name)).toEqual(["tmp"])
        expect(settings.model).toMatch(/models[/\\]shakespeare$/)
      }

      // Non-root, read-only root file system with a writable /tmp.
      expect(pod.spec.securityContext.runAsNonRoot).toBe(true)
      expect(pod.spec.securityContext.runAsUser).toBeGreaterThan(0)
      expect(container.securityContext.readOnlyRootFilesystem).toBe(true)
      expect(container.volumeMounts.find((v: any) => v.mountPath === "/tmp")).toBeDefined()

      // Selectors select the pods; the Service and ServiceMonitor reach the http port's /metrics.
      const labels = pod.metadata.labels
      expect(selects(deployment.spec.selector.matchLabels, labels)).toBe(true)
      const service = find(manifests, "Service")
      expect(selects(service.spec.selector, labels)).toBe(true)
      expect(service.spec.ports[0].targetPort).toBe("http")
      const pdb = find(manifests, "PodDisruptionBudget")
      expect(selects(pdb.spec.selector.matchLabels, labels)).toBe(true)
      expect(pdb.spec.maxUnavailable).toBe(1)
      const monitor = find(manifests, "ServiceMonitor")
      expect(selects(monitor.spec.selector.matchLabels, service.metadata.labels)).toBe(true)
      expect(monitor.spec.endpoints[0]).toMatchObject({ port: service.spec.ports[0].name, path: "/metrics" })

      // The HPA scales this Deployment, above the PDB's floor.
      const hpa = find(manifests, "HorizontalPodAutoscaler")
      expect(hpa.spec.scaleTargetRef).toEqual({ apiVersion: "apps/v1", kind: "Deployment", name: deployment.metadata.name })
      expect(hpa.spec.minReplicas).toBeGreaterThan(pdb.spec.maxUnavailable)
      expect(hpa.spec.maxReplicas).toBeGreaterThan(hpa.spec.minReplicas)
    })
  }

  it("the HPA's queue-depth metric is served by the adapter's rule, from a metric vdiff exports", async () => {
    const hpa = find(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
    const [metric] = hpa.spec.metrics
    expect(metric.type).toBe("Pods")
    const adapter = find(rendered["prometheus-adapter"], "ConfigMap")
    const rules = parseYaml(adapter.data["config.yaml"]).rules
    const rule = rules.find((r: any) => r.name.as === metric.pods.metric.name)
    expect(rule, `a rule serving ${metric.pods.metric.name}`).toBeDefined()
    expect(rule.resources.overrides).toEqual({ namespace: { resource: "namespace" }, pod: { resource: "pod" } })
    expect(rule.metricsQuery).toContain("<<.LabelMatchers>>")
    const series = /^([a-zA-Z_:][a-zA-Z0-9_:]*)\{/.exec(rule.seriesQuery)![1]!
    expect(new RegExp(rule.name.matches).test(series)).toBe(true)
    // The series is what GET /metrics renders for the scheduler's waiting-requests gauge.
    const scraped = await Effect.gen(function* () {
      const telemetry = yield* Telemetry.Telemetry
      yield* Metric.set(Metrics.numRequestsWaiting, 3)
      return yield* telemetry.scrape
    }).pipe(Effect.provide(Telemetry.layer({ serviceVersion: "0.0.0" })), Effect.runPromise)
    expect(scraped).toMatch(new RegExp(`^# TYPE ${series} gauge$`, "m"))
  })

  it("kserve: the runtime serves the InferenceService's format, with the base's settings and probes", () => {
    const runtime = find(rendered.kserve, "ServingRuntime")
    const isvc = find(rendered.kserve, "InferenceService")
    const base = find(rendered["overlays/gpu"], "Deployment").spec.template.spec.containers[0]
    const baseConfig = find(rendered["overlays/gpu"], "ConfigMap").data
    expect(isvc.spec.predictor.model.runtime).toBe(runtime.metadata.name)
    expect(runtime.spec.supportedModelFormats.map((f: any) => f.name)).toContain(isvc.spec.predictor.model.modelFormat.name)
    expect(isvc.metadata.annotations["serving.kserve.io/deploymentMode"]).toBe("RawDeployment")
    const container = runtime.spec.containers[0]
    expect(container.name).toBe("kserve-container")
    expect(container.image).toBe("vdiff:cuda")
    const env = Object.fromEntries(container.env.map((e: any) => [e.name, e.value]))
    const settings = loadSettings(env)
    // KServe's storage initializer puts the model in /mnt/models; the name is the InferenceService's.
    expect(settings.model).toBe("/mnt/models")
    expect(container.args).toEqual(["--served-model-name", "{{.Name}}"])
    expect(Either.isRight(Config.load({ argv: ["--served-model-name", isvc.metadata.name], env }))).toBe(true)
    expect(container.ports[0].containerPort).toBe(settings.port)
    expect(settings.shutdownTimeout).toBe(Number(baseConfig.VDIFF_SHUTDOWN_TIMEOUT))
    expect(settings.device).toBe(baseConfig.VDIFF_DEVICE)
    for (const probe of ["startupProbe", "livenessProbe", "readinessProbe"]) {
      expect(container[probe].httpGet).toEqual({ ...base[probe].httpGet, port: settings.port })
      const { httpGet: _a, ...rest } = container[probe]
      const { httpGet: _b, ...baseRest } = base[probe]
      expect(rest, probe).toEqual(baseRest)
    }
    expect(container.lifecycle).toEqual(base.lifecycle)
    expect(isvc.spec.predictor.model.resources.limits["nvidia.com/gpu"]).toBe("1")
  })
})
