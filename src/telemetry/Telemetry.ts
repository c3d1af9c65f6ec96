/**
 * OpenTelemetry for vdiff: the Effect Metrics of metrics.ts through a Prometheus exporter, and Effect's
 * spans through an OpenTelemetry tracer exporting over OTLP/HTTP.
 *
 * Metrics: @effect/opentelemetry's metric producer reads Effect's metric registry into an OpenTelemetry
 * PrometheusExporter that starts no server of its own (preventServerStart); `scrape` renders it as
 * Prometheus text for vdiff's own GET /metrics. The registry is global, so `scrape` shows every Effect
 * Metric of the process — except Effect's own per-fiber runtime metrics (effect_fiber_*), which the
 * runtime records by default and which say nothing an operator of vdiff can act on.
 *
 * Traces: with an OTLP endpoint (--otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT) spans are batched and
 * POSTed as OTLP/HTTP JSON to `<endpoint>/v1/traces` (or to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as it is,
 * when set); server spans get their status from the HTTP status and lose credentials first
 * (serverSpans.ts); span processors given directly (tests: an
 * in-memory exporter) are used as well. A caller's W3C traceparent is continued, and its sampled flag is
 * honoured: a request whose caller did not sample its trace records no spans. With neither, tracing is turned off (Effect's spans become no-op
 * spans), so an untraced server pays nothing for them. The service name is OTEL_SERVICE_NAME, else
 * "vdiff"; OTEL_RESOURCE_ATTRIBUTES adds resource attributes. Export failures (a collector that cannot be
 * reached) are logged as warnings.
 *
 * Provide this layer beneath the server's layers (Layer.provide): the tracer it installs is a fiber-local
 * setting that the fibers built on top of it inherit. Releasing it flushes the spans not yet exported
 * (waiting at most 3 s for the collector).
 *
 * @since 0.1.0
 */
import * as OtelMetrics from "@effect/opentelemetry/Metrics"
import * as NodeSdk from "@effect/opentelemetry/NodeSdk"
import * as OtelResource from "@effect/opentelemetry/Resource"
import * as OtelTracer from "@effect/opentelemetry/Tracer"
import { diag, DiagLogLevel, TraceFlags } from "@opentelemetry/api"
import { PrometheusExporter, PrometheusSerializer } from "@opentelemetry/exporter-prometheus"
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http"
import type { MetricProducer } from "@opentelemetry/sdk-metrics"
import { BatchSpanProcessor, type SpanProcessor } from "@opentelemetry/sdk-trace-base"
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from "@opentelemetry/semantic-conventions"
import { Config, Context, Effect, Layer, Option, Runtime, Tracer } from "effect"
import { serverSpanConventions } from "./serverSpans.js"

export interface TelemetryShape {
  /** Every metric of the process as Prometheus text (exposition format 0.0.4). */
  readonly scrape: Effect.Effect<string>
  /** Whether spans are recorded and exported. */
  readonly tracing: boolean
}

export class Telemetry extends Context.Tag("vdiff/Telemetry")<Telemetry, TelemetryShape>() {}

export interface TelemetryOptions {
  /** service.name when OTEL_SERVICE_NAME is not set; default "vdiff". */
  readonly serviceName?: string
  readonly serviceVersion?: string
  /**
   * OTLP/HTTP base URL, with OTEL_EXPORTER_OTLP_ENDPOINT's meaning: spans go to `<endpoint>/v1/traces`.
   * Absent: no OTLP export.
   */
  readonly otlpEndpoint?: string | undefined
  /** More span processors (e.g. a SimpleSpanProcessor over an InMemorySpanExporter in tests). */
  readonly spanProcessors?: ReadonlyArray<SpanProcessor>
}

/** Where OTLP/HTTP wants the spans of a base endpoint. */
export const tracesUrl = (endpoint: string): string => endpoint.replace(/\/+$/, "") + "/v1/traces"

const resourceLayer = (options: TelemetryOptions) =>
  Layer.unwrapEffect(
    Effect.map(Effect.orDie(Config.option(Config.string("OTEL_SERVICE_NAME"))), (fromEnv) =>
      OtelResource.layerFromEnv({
        [ATTR_SERVICE_NAME]: Option.getOrElse(fromEnv, () => options.serviceName ?? "vdiff"),
        ...(options.serviceVersion === undefined ? {} : { [ATTR_SERVICE_VERSION]: options.serviceVersion })
      })
    )
  )

/** The producer's metrics without the ones `drop` names. */
const withoutMetrics = (producer: MetricProducer, drop: (name: string) => boolean): MetricProducer => ({
  collect: (options) =>
    producer.collect(options).then((result) => ({
      ...result,
      resourceMetrics: {
        ...result.resourceMetrics,
        scopeMetrics: result.resourceMetrics.scopeMetrics.map((scope) => ({
          ...scope,
          metrics: scope.metrics.filter((metric) => !drop(metric.descriptor.name))
        }))
      }
    }))
})

const isFiberMetric = (name: string) => name.startsWith("effect_fiber_")

/** The Prometheus side: Effect's registry → OpenTelemetry producer → PrometheusExporter → text. */
const metricsLayer = (tracing: boolean) =>
  Layer.scoped(
    Telemetry,
    Effect.gen(function* () {
      // The scope-info label would put otel_scope_name="@effect/opentelemetry/Metrics" on every sample.
      const exporter = new PrometheusExporter({ preventServerStart: true, withoutScopeInfo: true })
      const serializer = new PrometheusSerializer(undefined, false, undefined, false, true)
      const producer = withoutMetrics(yield* OtelMetrics.makeProducer, isFiberMetric)
      yield* OtelMetrics.registerProducer(producer, () => exporter)
      const scrape = Effect.promise(() => exporter.collect()).pipe(
        Effect.tap(({ errors }) =>
          errors.length === 0 ? Effect.void : Effect.logWarning("metrics collection reported errors", errors.map(String))
        ),
        Effect.map(({ resourceMetrics }) => serializer.serialize(resourceMetrics))
      )
      return { scrape, tracing } satisfies TelemetryShape
    })
  )

/**
 * OpenTelemetry reports what goes wrong (a collector that cannot be reached, a rejected export) to its
 * global diagnostic logger, which is silent until set: its warnings and errors become vdiff's log lines.
 */
const diagnosticsLayer = Layer.scopedDiscard(
  Effect.gen(function* () {
    const runFork = Runtime.runFork(yield* Effect.runtime<never>())
    const warn = (message: string, ...args: Array<unknown>) =>
      void runFork(Effect.logWarning(`opentelemetry: ${message}`, ...args.map(String)))
    const ignore = () => {}
    diag.setLogger({ error: warn, warn, info: ignore, debug: ignore, verbose: ignore }, DiagLogLevel.WARN)
    yield* Effect.addFinalizer(() => Effect.sync(() => diag.disable()))
  })
)

/**
 * A parent span from a caller's traceparent with the sampled flag its header carried. @effect/platform
 * reads the flag into the span's `sampled`, but the OpenTelemetry tracer takes a parent's flags from its
 * own context entry, which such a span lacks, and so treats every caller's trace as sampled: a caller that
 * decided not to record a trace ("-00") got vdiff's spans exported anyway.
 */
const withCallersFlags = (parent: Tracer.AnySpan): Tracer.AnySpan =>
  parent._tag === "ExternalSpan" && !parent.sampled
    ? {
        ...parent,
        context: Context.merge(
          parent.context,
          OtelTracer.makeExternalSpan({ traceId: parent.traceId, spanId: parent.spanId, traceFlags: TraceFlags.NONE }).context
        )
      }
    : parent

/** OpenTelemetry's tracer, whose spans under a caller's trace follow the caller's sampling decision. */
const honourCallersSampling = (tracer: Tracer.Tracer): Tracer.Tracer =>
  Tracer.make({
    span: (name, parent, context, links, startTime, kind, options) =>
      tracer.span(name, Option.map(parent, withCallersFlags), context, links, startTime, kind, options),
    context: tracer.context
  })

/** The tracer: OpenTelemetry's over the given processors, or tracing off when there are none. */
const tracingLayer = (processors: ReadonlyArray<SpanProcessor>) => {
  const [first, ...rest] = processors
  if (first === undefined) return Layer.setTracerEnabled(false)
  return Layer.unwrapEffect(Effect.map(OtelTracer.make, (tracer) => Layer.setTracer(honourCallersSampling(tracer)))).pipe(
    Layer.provideMerge(OtelTracer.layerTracer),
    Layer.provide(NodeSdk.layerTracerProvider([first, ...rest])),
    // Beneath the provider, so that the provider's last flush on release can still report.
    Layer.provideMerge(diagnosticsLayer)
  )
}

/** Metrics always; traces when there is somewhere to send them (see the module comment). */
export const layer = (options: TelemetryOptions = {}): Layer.Layer<Telemetry> =>
  Layer.unwrapEffect(
    Effect.gen(function* () {
      // OpenTelemetry's signal-specific variable names the traces URL itself, and wins over the base one.
      const tracesEndpoint = yield* Effect.orDie(Config.option(Config.nonEmptyString("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))
      const url = Option.isSome(tracesEndpoint)
        ? tracesEndpoint.value
        : options.otlpEndpoint === undefined
          ? undefined
          : tracesUrl(options.otlpEndpoint)
      // Made when the layer is built, so that each build exports through its own processor.
      const processors: Array<SpanProcessor> = [...(options.spanProcessors ?? [])]
      if (url !== undefined) processors.push(new BatchSpanProcessor(new OTLPTraceExporter({ url })))
      // Ahead of the exporting processors: HTTP status and redaction as the conventions ask (serverSpans.ts).
      if (processors.length > 0) processors.unshift(serverSpanConventions())
      return Layer.merge(metricsLayer(processors.length > 0), tracingLayer(processors)).pipe(Layer.provide(resourceLayer(options)))
    })
  )
