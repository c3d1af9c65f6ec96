/**
 * The Scheduler: bounded admission, continuous batching, cancellation, deadlines and drain.
 *
 * One scheduler fiber owns every live sequence. Before each denoising step it drops what was cancelled or
 * ran out of time, admits waiting requests (first come, first served) while the batch has room, then
 * advances all live sequences with ONE engine step and routes each result to its request's mailbox.
 * Requests join and leave between steps. A request with `n > 1` is n sequences in the same batch.
 *
 * Fairness: admission is strictly FIFO (a request that does not fit yet blocks the ones behind it rather
 * than being overtaken), and every live sequence advances on every step. So a waiting request is admitted
 * at the latest when the requests ahead of it are admitted and the live ones it waits for have finished,
 * which each does within its own planned steps (or its deadline): no request waits on an unbounded
 * number of others.
 *
 * Telemetry (telemetry/metrics.ts): the running and waiting gauges, queue time, denoising steps, batch
 * size, tokens per step and step duration are updated here, where they happen. Each request gets two
 * spans under the span it was submitted in: "vdiff.queue_wait" (submission → admission) and
 * "vdiff.generate" (admission → end, with its step and token counts).
 */
import { Clock, Context, Deferred, Effect, Exit, FiberId, Layer, Mailbox, Metric, Option, Queue, Stream, type Tracer } from "effect"
import {
  Engine,
  type FinishReason,
  familyOf,
  type ModelFamily,
  phaseOf,
  type SamplingSettings,
  type ScoreItem,
  type Scored,
  type SequenceId,
  type StepResult
} from "../engine/Engine.js"
import { EngineFailure, type EngineError, InvalidRequestError } from "../engine/errors.js"
import { kvPositions } from "../telemetry/kvReuse.js"
import * as Metrics from "../telemetry/metrics.js"
import { Draining, QueueFull, RequestTimeout } from "./errors.js"

export interface GenerationRequest {
  readonly prompt: ReadonlyArray<number>
  /** Tokens after the answer (infilling): the canvas is prompt, answer, suffix. */
  readonly suffix?: ReadonlyArray<number>
  readonly settings: SamplingSettings
  /** Independent answers to the same prompt, run as `n` sequences of one batch. Seeds are seed, seed+1, ... */
  readonly n?: number
  /** Overrides the scheduler's request timeout for this request (milliseconds, from submission). */
  readonly timeoutMs?: number
  /**
   * Answer positions fixed from the start (genLength entries: -1 where the model writes, else the token):
   * the model denoises around them, e.g. the values of a JSON skeleton (Engine.create).
   */
  readonly template?: ReadonlyArray<number>
  /**
   * Asked when the consumer stops reading before the events end: whether its answers were complete by
   * then (decided before the last block was denoised: an end token, a stop, max_tokens mid-block). Such a
   * request counts as finished; one whose consumer went away without them (a disconnect) as cancelled.
   */
  readonly answersComplete?: () => boolean
}

/**
 * What one denoising step did to one of a request's sequences: which of its `n` answers, and the engine's
 * step result for it as the addon made it (committed tokens, block, step counts, finish).
 */
export interface StepEvent {
  readonly index: number
  readonly step: StepResult
}

export interface ChoiceResult {
  readonly index: number
  /** The whole answer, one token id per position. */
  readonly tokens: ReadonlyArray<number>
  /** The probability each position's token had when it was committed. */
  readonly probabilities: ReadonlyArray<number>
  readonly reason: FinishReason
  readonly steps: number
  readonly forwardPasses: number
  /** Positions committed by denoising (the rest, if any, an early stop filled with EOS). */
  readonly tokensDenoised: number
}

export interface GenerationResult {
  readonly choices: ReadonlyArray<ChoiceResult>
}

export type GenerationError = EngineError | QueueFull | Draining | RequestTimeout

export interface SchedulerStats {
  readonly waiting: number
  readonly running: number
  readonly runningSequences: number
  readonly capacity: number
  readonly maxConcurrent: number
  readonly draining: boolean
  /** Batched engine steps taken. */
  readonly stepsTotal: number
  /** Sequence-steps: the sum of the batch sizes of all steps. */
  readonly sequenceStepsTotal: number
  /** Tokens committed by denoising (not the EOS an early stop fills in). */
  readonly tokensCommitted: number
  /** Jobs that ran to their end, or whose consumer ended their events with its answers complete. */
  readonly requestsFinished: number
  /** Jobs freed because their consumer went away before its answers were complete (a client disconnect). */
  readonly cancelledTotal: number
  /**
   * The most engine steps that ended between a consumer going away and its job being freed: 1 when the
   * step in flight at the time was the last (the loop frees cancelled jobs before each step), 0 between steps.
   */
  readonly stepsAfterCancelMax: number
  /** Sequences per engine step, on average. */
  readonly averageBatchSize: number
  /** Tokens committed per sequence per step, on average. */
  readonly averageTokensPerStep: number
}

export interface SchedulerShape {
  /** A stream of step events; ends when every sequence has finished. Ending the stream early cancels it. */
  readonly generateStream: (request: GenerationRequest) => Stream.Stream<StepEvent, GenerationError>
  /** Runs a request to the end and collects its answers. */
  readonly generate: (request: GenerationRequest) => Effect.Effect<GenerationResult, GenerationError>
  /**
   * The model's log-probabilities of tokens on canvases (Engine.score): a job of the queue like a
   * generation, run when it reaches the head, between two steps, in forwards no larger than a step's batch
   * (maxConcurrent canvases, maxBatchTokens canvas tokens). It takes no room in the batch. Per item, one
   * log-probability per target.
   */
  readonly score: (request: ScoreRequest) => Effect.Effect<ReadonlyArray<Scored>, GenerationError>
  readonly stats: Effect.Effect<SchedulerStats>
  /**
   * Stops admitting (new requests fail with Draining), lets in-flight and queued work finish until
   * `timeoutMs` has passed, then ends whatever is left with Draining.
   */
  readonly drain: (timeoutMs: number) => Effect.Effect<void>
}

export class Scheduler extends Context.Tag("vdiff/Scheduler")<Scheduler, SchedulerShape>() {}

export interface SchedulerOptions {
  /** Sequences stepped together at most (the batch size). */
  readonly maxConcurrent: number
  /** Requests that may wait for admission; beyond it submissions fail with QueueFull. */
  readonly queueCapacity: number
  /** Canvas tokens (prompt + answer, doubled under cfg) the live batch may hold at most. */
  readonly maxBatchTokens: number
  /** Default per-request deadline in milliseconds; 0 for none. */
  readonly requestTimeoutMs: number
}

/** What every job of the queue has, a generation or a scoring. */
interface QueuedJob {
  readonly n: number
  readonly tokens: number
  readonly deadline: number
  /** The deadline's length, for its error. */
  readonly timeoutMs: number
  readonly mailbox: Mailbox.Mailbox<StepEvent, GenerationError>
  /** stepsTotal when the consumer went away (the loop frees the job before the next step); unset while it is there. */
  cancelledAtStep: number | undefined
  /**
   * The consumer ended its events itself, having all it wanted (an answer decided before its last block is
   * denoised: an end token, a stop, max_tokens mid-block), rather than being cut off: finished, not cancelled.
   */
  answered: boolean
  /** Clock.currentTimeNanos at submission, for the queue time. */
  readonly submittedAt: bigint
  /** Open from submission to admission. */
  readonly queueSpan: Tracer.Span
  /** Open from admission to the end. */
  generationSpan: Tracer.Span | undefined
}

/** Canvases to score (Engine.score), run as one job of the queue when it reaches the head. */
export interface ScoreRequest {
  readonly items: ReadonlyArray<ScoreItem>
  /** Overrides the scheduler's request timeout for this request (milliseconds, from submission). */
  readonly timeoutMs?: number
}

interface ScoreJob extends QueuedJob {
  readonly kind: "score"
  readonly request: ScoreRequest
  /** Set when its forwards have run. */
  scores: ReadonlyArray<Scored> | undefined
}

interface Job extends QueuedJob {
  readonly kind: "generate"
  readonly request: GenerationRequest
  sequences: Array<SequenceId>
  /** Its sequences that have finished; they wait, unstepped, for the others (an early stop ends one sooner). */
  readonly finished: Set<SequenceId>
  /** The most denoising steps any of its sequences has taken, and the tokens they committed. */
  steps: number
  tokensCommitted: number
  /**
   * Per sequence: the KV refreshes, computed positions, forwards and copied prompt positions its last step
   * reported (a step that adds a refresh refreshed the cache; the positions it adds are what its forward
   * computed; one that adds no forward waited for another sequence's prefill).
   */
  readonly lastStep: Map<
    SequenceId,
    { readonly kvRefreshes: number; readonly positionsComputed: number; readonly forwardPasses: number; readonly promptCached: number }
  >
}

/** A request's canvas positions: block decoding's canvas runs to the end of the block the answer ends in. */
const canvasTokens = (request: GenerationRequest, n: number, family: ModelFamily) => {
  const length = request.prompt.length + request.settings.genLength + (request.suffix?.length ?? 0)
  const canvas =
    family.decoding === "block" && family.blockLength > 0 ? Math.ceil(length / family.blockLength) * family.blockLength : length
  return n * canvas * (request.settings.cfgScale > 0 ? 2 : 1)
}

export const make = (options: SchedulerOptions) =>
  Effect.gen(function* () {
    const engine = yield* Engine
    const family = familyOf(engine.info)
    // Whether the engine keeps whole prompt blocks across requests (block decoding with --prefix-cache).
    const prefixCached = family.decoding === "block" && (engine.info.prefixCacheBytes ?? 0) > 0
    const kvTotals = { attended: 0, reused: 0 }
    const waiting = yield* Queue.unbounded<Job | ScoreJob>()
    const running: Array<Job> = []
    const state = {
      draining: false,
      stopping: undefined as Draining | undefined,
      /** Set when the scope closes: the loop is gone, so nothing offered to the queue after this runs. */
      closed: false,
      stepsTotal: 0,
      sequenceStepsTotal: 0,
      tokensCommitted: 0,
      requestsFinished: 0,
      cancelledTotal: 0,
      stepsAfterCancelMax: 0
    }

    /** Completed once draining has begun and nothing is left: the loop idles, or the scheduler stopped. */
    const drained = yield* Deferred.make<void>()

    // Queue.size is negative while the loop waits in Queue.take: count only requests.
    const queueLength = Effect.map(Queue.size(waiting), (size) => Math.max(0, size))
    /**
     * Every job submitted and not yet ended, wherever it is: in the queue, at its head, running, or in the
     * hand-off between the queue and the loop (taken from the queue, not yet the head), where neither the
     * queue nor the loop's variables show it. Drain waits for these; the scope's close tells each one.
     */
    const unended = new Set<Job | ScoreJob>()
    const busy = Effect.map(queueLength, (queued) => running.length > 0 || head !== undefined || queued > 0 || unended.size > 0)
    const runningSequences = () => running.reduce((sum, job) => sum + job.sequences.length, 0)
    const runningTokens = () => running.reduce((sum, job) => sum + job.tokens, 0)
    /**
     * Whether a job of n sequences and `tokens` canvas tokens, arriving now, waits for room, and how many
     * jobs wait before it: the jobs not running, in arrival order, less those the batch's free room takes
     * at the loop's next admission (a burst that reaches an idle server between two steps waits for nothing).
     * The queue's capacity bounds the waiting ones.
     */
    const waitingForRoom = (n: number, tokens: number) => {
      let sequences = runningSequences()
      let batchTokens = runningTokens()
      let empty = running.length === 0
      let waiting = 0
      const fits = (job: { readonly n: number; readonly tokens: number }) =>
        empty || (sequences + job.n <= options.maxConcurrent && batchTokens + job.tokens <= options.maxBatchTokens)
      for (const job of unended) {
        if (job.kind === "generate" && running.includes(job)) continue
        if (waiting === 0 && fits(job)) {
          sequences += job.n
          batchTokens += job.tokens
          empty = false
        } else {
          waiting++
        }
      }
      return { ahead: waiting, waits: waiting > 0 || !fits({ n, tokens }) }
    }

    const releaseJob = (job: Job) =>
      Effect.forEach(job.sequences, (id) => engine.release(id), { discard: true }).pipe(
        Effect.tap(() => {
          job.sequences = []
          const i = running.indexOf(job)
          if (i >= 0) running.splice(i, 1)
        })
      )

    /** Ends the job's open span: the generation's (with its counts) once admitted, else the queue wait's. */
    const endSpan = (job: Job | ScoreJob, exit: Exit.Exit<void, GenerationError>) =>
      Effect.map(Clock.currentTimeNanos, (now) => {
        unended.delete(job)
        const span = job.generationSpan ?? job.queueSpan
        if (span.status._tag === "Ended") return
        if (job.generationSpan !== undefined && job.kind === "generate") {
          span.attribute("vdiff.steps", job.steps)
          span.attribute("vdiff.tokens_committed", job.tokensCommitted)
        }
        span.end(now, exit)
      })

    /** Ends the job's events (Exit.void: its answers are complete) and its span. */
    const settle = (job: Job | ScoreJob, exit: Exit.Exit<void, GenerationError>) =>
      endSpan(job, exit).pipe(Effect.zipRight(job.mailbox.done(exit)))

    /** The consumer went away. */
    const cancelledExit = Exit.interrupt(FiberId.none)

    const failJob = (job: Job, error: GenerationError) => releaseJob(job).pipe(Effect.zipRight(settle(job, Exit.fail(error))))

    const published = { running: -1, waiting: -1, kvCacheBytes: -1 }
    /** The running and waiting gauges, from the figures `stats` reports; set when they change (every step asks). */
    const publishLoad = Effect.gen(function* () {
      const load = {
        running: running.length,
        waiting: (yield* queueLength) + (head === undefined ? 0 : 1),
        kvCacheBytes: yield* engine.kvCacheBytes
      }
      if (load.running !== published.running) yield* Metric.set(Metrics.numRequestsRunning, load.running)
      if (load.waiting !== published.waiting) yield* Metric.set(Metrics.numRequestsWaiting, load.waiting)
      if (load.kvCacheBytes !== published.kvCacheBytes) yield* Metric.set(Metrics.kvCacheBytes, load.kvCacheBytes)
      Object.assign(published, load)
    })

    /**
     * Admitted: the queue time is known, the wait's span ends and the work's begins ("vdiff.generate", or
     * "vdiff.score" for a scoring).
     */
    const startWork = (job: Job | ScoreJob) =>
      Effect.gen(function* () {
        const now = yield* Clock.currentTimeNanos
        yield* Metric.update(Metrics.requestQueueTime, Metrics.secondsBetween(job.submittedAt, now))
        job.queueSpan.end(now, Exit.void)
        const parent = Option.getOrUndefined(job.queueSpan.parent)
        if (job.kind === "score") {
          const items = job.request.items
          job.generationSpan = yield* Effect.makeSpan("vdiff.score", {
            parent,
            attributes: { "vdiff.canvases": items.length, "vdiff.positions": items.reduce((sum, item) => sum + item.positions.length, 0) }
          })
          return
        }
        const { request } = job
        job.generationSpan = yield* Effect.makeSpan("vdiff.generate", {
          parent,
          attributes: {
            "vdiff.n": job.n,
            "vdiff.prompt_tokens": request.prompt.length,
            "vdiff.gen_length": request.settings.genLength,
            "vdiff.block_length": request.settings.blockLength,
            "vdiff.steps_planned": request.settings.steps
          }
        })
      })

    const expired = (job: Job | ScoreJob, now: number) => job.deadline > 0 && now >= job.deadline

    const timeoutError = (job: Job | ScoreJob) =>
      new RequestTimeout({ message: `request timed out after ${job.timeoutMs} ms`, timeoutMs: job.timeoutMs })

    /**
     * Runs a scoring that reached the head of the queue, between two steps: its canvases in forwards that a
     * step's batch could be (at most maxConcurrent canvases, and maxBatchTokens canvas tokens unless one
     * canvas alone is more), then its answer.
     */
    const runScore = (job: ScoreJob) =>
      Effect.gen(function* () {
        yield* startWork(job)
        const { items } = job.request
        const scores: Array<Scored> = []
        for (let at = 0; at < items.length; ) {
          let end = at + 1
          let tokens = items[at]!.canvas.length
          while (end < items.length && end - at < options.maxConcurrent && tokens + items[end]!.canvas.length <= options.maxBatchTokens) {
            tokens += items[end]!.canvas.length
            end++
          }
          const started = yield* Clock.currentTimeNanos
          scores.push(...(yield* engine.score(items.slice(at, end))))
          yield* Metric.update(Metrics.scoreDuration, Metrics.secondsBetween(started, yield* Clock.currentTimeNanos))
          yield* Metric.incrementBy(Metrics.scoredCanvases, end - at)
          at = end
        }
        job.scores = scores
        state.requestsFinished++
        yield* settle(job, Exit.void)
      }).pipe(Effect.catchAll((error) => settle(job, Exit.fail(error))))

    /**
     * Creates the job's sequences; true when it runs. A refused request fails alone, except that a KV
     * cache the live caches leave no room for (VDIFF_OUT_OF_MEMORY) waits, first in line, for running
     * requests to finish and free theirs: false. With nothing running the room will never come, so it fails.
     */
    const admit = (job: Job) =>
      Effect.gen(function* () {
        const created: Array<SequenceId> = []
        for (let i = 0; i < job.n; i++) {
          const settings = { ...job.request.settings, seed: job.request.settings.seed + i }
          const id = yield* engine
            .create(job.request.prompt, settings, job.request.suffix, job.request.template)
            .pipe(Effect.tapError(() => Effect.forEach(created, (id) => engine.release(id), { discard: true })))
          created.push(id)
        }
        job.sequences = created
        running.push(job)
        yield* startWork(job)
        return true
      }).pipe(
        Effect.catchAll((error) =>
          error._tag === "EngineFailure" && error.code === "VDIFF_OUT_OF_MEMORY" && running.length > 0
            ? Effect.succeed(false)
            : Effect.as(settle(job, Exit.fail(error)), true)
        )
      )

    /** Looks at the head of the queue without losing FIFO order: a job taken but not admitted is kept. */
    let head: Job | ScoreJob | undefined
    const nextWaiting = Effect.gen(function* () {
      if (head === undefined) head = Option.getOrUndefined(yield* Queue.poll(waiting))
      return head
    })

    const admitWaiting = Effect.gen(function* () {
      while (true) {
        const job = yield* nextWaiting
        if (job === undefined) return
        const now = yield* Clock.currentTimeMillis
        if (job.cancelledAtStep !== undefined) {
          head = undefined
          countCancelled(job.cancelledAtStep)
          yield* endSpan(job, cancelledExit)
          continue
        }
        if (expired(job, now)) {
          head = undefined
          yield* settle(job, Exit.fail(timeoutError(job)))
          continue
        }
        if (job.kind === "score") {
          head = undefined
          yield* runScore(job)
          continue
        }
        const fits =
          running.length === 0 ||
          (runningSequences() + job.n <= options.maxConcurrent && runningTokens() + job.tokens <= options.maxBatchTokens)
        if (!fits) return
        if (!(yield* admit(job))) return
        head = undefined
      }
    })

    const countCancelled = (cancelledAtStep: number) => {
      state.cancelledTotal++
      state.stepsAfterCancelMax = Math.max(state.stepsAfterCancelMax, state.stepsTotal - cancelledAtStep)
    }

    const reap = Effect.gen(function* () {
      if (state.stopping !== undefined) {
        const stopping = Exit.fail(state.stopping)
        for (const job of [...running]) yield* failJob(job, state.stopping)
        if (head !== undefined) yield* settle(head, stopping)
        head = undefined
        for (const job of yield* Queue.takeAll(waiting)) yield* settle(job, stopping)
        return
      }
      const now = yield* Clock.currentTimeMillis
      for (const job of [...running]) {
        if (job.cancelledAtStep !== undefined && job.answered) {
          state.requestsFinished++
          yield* releaseJob(job).pipe(Effect.zipRight(endSpan(job, Exit.void)))
        } else if (job.cancelledAtStep !== undefined) {
          countCancelled(job.cancelledAtStep)
          yield* releaseJob(job).pipe(Effect.zipRight(endSpan(job, cancelledExit)))
        } else if (expired(job, now)) yield* failJob(job, timeoutError(job))
      }
    })

    /** The phase mix and the KV reuse of one sequence's forward. */
    const observeForward = (job: Job, r: StepResult) =>
      Effect.gen(function* () {
        const phase = phaseOf(r)
        const last = job.lastStep.get(r.id)
        const refreshed = r.kvRefreshes > (last?.kvRefreshes ?? 0)
        const positionsComputed = r.positionsComputed ?? 0
        const promptCached = r.promptCached ?? 0
        job.lastStep.set(r.id, { kvRefreshes: r.kvRefreshes, positionsComputed, forwardPasses: r.forwardPasses, promptCached })
        const promptLength = job.request.prompt.length
        if (prefixCached && job.request.settings.kvCache === "prefix" && promptLength >= family.blockLength) {
          // Queried once per sequence; hits as its copies happen (a sequence that waited for another's
          // prefill copies after its first step).
          if (last === undefined) yield* Metric.incrementBy(Metrics.prefixCacheQueries, promptLength)
          if (promptCached > (last?.promptCached ?? 0))
            yield* Metric.incrementBy(Metrics.prefixCacheHits, promptCached - (last?.promptCached ?? 0))
        }
        // A sequence waiting for another's prefill of the same prompt blocks ran no forward this step.
        if (phase === "prefill" && r.forwardPasses <= (last?.forwardPasses ?? 0)) return
        yield* Metric.increment(Metrics.stepPhases[phase])
        const kv = kvPositions(
          family,
          { promptLength, suffixLength: job.request.suffix?.length ?? 0, settings: job.request.settings },
          {
            phase,
            block: r.block,
            refreshed,
            promptCached: r.promptCached,
            positionsComputed,
            computed: positionsComputed - (last?.positionsComputed ?? 0)
          }
        )
        if (kv.attended === 0) return
        kvTotals.attended += kv.attended
        kvTotals.reused += kv.reused
        yield* Metric.incrementBy(Metrics.kvPositionsAttended, kv.attended)
        yield* Metric.incrementBy(Metrics.kvPositionsReused, kv.reused)
        yield* Metric.set(Metrics.kvReuseShare, kvTotals.reused / kvTotals.attended)
      })

    const route = (job: Job, results: ReadonlyArray<StepResult>) =>
      Effect.gen(function* () {
        for (const r of results) {
          const index = job.sequences.indexOf(r.id)
          if (index < 0) continue
          yield* job.mailbox.offer({ index, step: r })
          const denoised = r.committed.length - r.filled
          state.tokensCommitted += denoised
          job.tokensCommitted += denoised
          job.steps = Math.max(job.steps, r.stepsDone)
          // A prefill or commit forward (block decoding) is no denoising step: it commits nothing by design.
          if (phaseOf(r) === "denoise") yield* Metric.update(Metrics.tokensPerStep, denoised)
          yield* observeForward(job, r)
          if (r.finished) job.finished.add(r.id)
        }
        if (job.finished.size === job.n) {
          state.requestsFinished++
          yield* releaseJob(job)
          yield* settle(job, Exit.void)
        }
      })

    /**
     * On the CPU backend, waits until the event loop has run what the last step set off (the consumers of
     * its events: text decoding, SSE chunks, metrics) before the next step starts. A CPU step keeps every
     * core busy; JavaScript running beside it takes a core from one of its threads, and the others wait
     * for that thread at each of the step's barriers: on two cores, 1 ms of JavaScript beside a 7 ms step
     * made it 2-3 ms longer, the same work run before it cost its 1 ms (bench/server.mjs has the
     * server's side of it). A GPU step leaves the cores free, so there the JavaScript runs beside it.
     */
    const quiet =
      engine.info.backend === "cpu"
        ? Effect.async<void>((resume) => {
            const handle = setImmediate(() => resume(Effect.void))
            return Effect.sync(() => clearImmediate(handle))
          })
        : Effect.void

    /** The job's sequences still to step: the engine refuses to step a finished one. */
    const unfinished = (job: Job) => job.sequences.filter((id) => !job.finished.has(id))

    /**
     * One batched step. If the batch fails, each job is stepped alone once more so that a fault fails only
     * the request it belongs to (a failed step leaves sequences unchanged, so retrying is safe).
     */
    const stepAll = Effect.gen(function* () {
      const jobs = [...running]
      const ids = jobs.flatMap(unfinished)
      const started = yield* Clock.currentTimeNanos
      const batch = yield* Effect.either(engine.step(ids))
      yield* Metric.update(Metrics.stepDuration, Metrics.secondsBetween(started, yield* Clock.currentTimeNanos))
      yield* Metric.increment(Metrics.denoisingSteps)
      yield* Metric.update(Metrics.batchSize, ids.length)
      state.stepsTotal++
      state.sequenceStepsTotal += ids.length
      if (batch._tag === "Right") {
        for (const job of jobs) yield* route(job, batch.right)
        return
      }
      if (jobs.length === 1) return yield* failJob(jobs[0]!, batch.left)
      for (const job of jobs) {
        const alone = yield* Effect.either(engine.step(unfinished(job)))
        if (alone._tag === "Right") yield* route(job, alone.right)
        else yield* failJob(job, alone.left)
      }
    })

    const loop = Effect.gen(function* () {
      while (true) {
        if (running.length === 0 && head === undefined) {
          // Nothing to do: tell a drain so, and sleep until a request arrives.
          yield* publishLoad
          if (state.draining && !(yield* busy)) yield* Deferred.succeed(drained, undefined)
          head = yield* Queue.take(waiting)
        } else {
          // The last step's consumers run first: they leave the cores to the next step, and a consumer
          // that went away is freed before it.
          yield* quiet
        }
        yield* reap
        yield* admitWaiting
        yield* publishLoad
        if (running.length > 0) yield* stepAll
      }
    })

    // Whatever is still live or waiting when the scheduler's scope closes is released and told so.
    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        state.closed = true
        const closing = new Draining({ message: "the scheduler has stopped" })
        for (const job of [...running]) yield* failJob(job, closing)
        if (head !== undefined) yield* settle(head, Exit.fail(closing))
        for (const job of yield* Queue.takeAll(waiting)) yield* settle(job, Exit.fail(closing))
        // And one the loop had taken from the queue when it was interrupted, before it became the head.
        for (const job of [...unended]) yield* settle(job, Exit.fail(closing))
        yield* Deferred.succeed(drained, undefined)
      })
    )
    yield* Effect.forkScoped(loop)

    const validate = (request: GenerationRequest, n: number) => {
      if (!Number.isInteger(n) || n < 1 || n > options.maxConcurrent) {
        return Effect.fail(
          new InvalidRequestError({
            message: `n must be an integer from 1 to ${options.maxConcurrent} (the batch size), got ${n}`,
            param: "n"
          })
        )
      }
      if (request.timeoutMs !== undefined && !(request.timeoutMs > 0)) {
        return Effect.fail(new InvalidRequestError({ message: "timeout must be positive", param: "timeout" }))
      }
      return Effect.void
    }

    /**
     * Puts a job in the queue, unless the server is draining or the queue is full. `n` and `tokens` are the
     * room it needs in the batch (a scoring needs none: it runs between steps).
     */
    const enqueue = <J extends Job | ScoreJob>(
      spec: { readonly n: number; readonly tokens: number; readonly timeoutMs: number | undefined; readonly promptTokens: number },
      make: (queued: QueuedJob) => J
    ) =>
      Effect.gen(function* () {
        if (state.draining) return yield* new Draining({ message: "the server is shutting down" })
        const timeoutMs = spec.timeoutMs ?? options.requestTimeoutMs
        const now = yield* Clock.currentTimeMillis
        // The loop may hold the head of the queue while it waits for room; it still counts as waiting.
        const queued = (yield* queueLength) + (head === undefined ? 0 : 1)
        const room = waitingForRoom(spec.n, spec.tokens)
        if (room.waits && room.ahead >= options.queueCapacity) {
          return yield* new QueueFull({
            message: `the request queue is full (${options.queueCapacity} waiting); retry later`,
            retryAfterSeconds: 1
          })
        }
        const job = make({
          n: spec.n,
          tokens: spec.tokens,
          deadline: timeoutMs > 0 ? now + timeoutMs : 0,
          timeoutMs,
          mailbox: yield* Mailbox.make<StepEvent, GenerationError>(),
          cancelledAtStep: undefined,
          answered: false,
          submittedAt: yield* Clock.currentTimeNanos,
          // A child of the submitter's span (the HTTP request's); the loop ends it at admission.
          queueSpan: yield* Effect.makeSpan("vdiff.queue_wait", {
            attributes: { "vdiff.n": spec.n, "vdiff.prompt_tokens": spec.promptTokens, "vdiff.queue_position": queued }
          }),
          generationSpan: undefined
        })
        unended.add(job)
        yield* Queue.offer(waiting, job)
        // The draining check above and this offer are not one step: a fiber can be preempted between them
        // while shutdown drains (an idle scheduler drains at once) and closes the scope. A job offered
        // after that would wait forever (a CI run held a request until HAProxy's 300 s timeout, which the
        // HTTP server's close waited on): it is told the scheduler has stopped. (One offered before the
        // finalizer's takeAll is told there; telling it twice is harmless.)
        if (state.closed) {
          yield* settle(job, Exit.fail(new Draining({ message: "the scheduler has stopped" })))
          return job
        }
        yield* publishLoad
        return job
      })

    const submit = (request: GenerationRequest) =>
      Effect.gen(function* () {
        const n = request.n ?? 1
        yield* validate(request, n)
        return yield* enqueue(
          { n, tokens: canvasTokens(request, n, family), timeoutMs: request.timeoutMs, promptTokens: request.prompt.length },
          (queued): Job => ({
            ...queued,
            kind: "generate",
            request,
            sequences: [],
            finished: new Set(),
            steps: 0,
            tokensCommitted: 0,
            lastStep: new Map()
          })
        )
      })

    /**
     * The job's events also end at its deadline, so a request stuck in the queue, or in a long step, times
     * out on time; the loop frees its sequences before its next step. (One timer for the request:
     * Stream.interruptWhen would race every pull, forking three fibers per step event.)
     */
    const watchDeadline = (job: Job | ScoreJob) =>
      Effect.gen(function* () {
        if (job.deadline <= 0) return
        const remaining = Math.max(0, job.deadline - (yield* Clock.currentTimeMillis))
        yield* Effect.forkScoped(
          Effect.sleep(remaining).pipe(Effect.zipRight(Effect.suspend(() => settle(job, Exit.fail(timeoutError(job))))))
        )
      })

    const generateStream = (request: GenerationRequest): Stream.Stream<StepEvent, GenerationError> =>
      Stream.unwrapScoped(
        Effect.gen(function* () {
          const job = yield* submit(request)
          // A job already ended (answered, failed, timed out) is not cancelled by its consumer's going.
          yield* Effect.addFinalizer(() =>
            Effect.sync(() => {
              if (!unended.has(job)) return
              job.cancelledAtStep = state.stepsTotal
              job.answered = request.answersComplete?.() === true
            })
          )
          yield* watchDeadline(job)
          return Mailbox.toStream(job.mailbox)
        })
      )

    const generate = (request: GenerationRequest): Effect.Effect<GenerationResult, GenerationError> =>
      Effect.gen(function* () {
        const n = request.n ?? 1
        const gen = request.settings.genLength
        const choices = Array.from({ length: n }, (_, index) => ({
          index,
          tokens: new Array<number>(gen).fill(-1),
          probabilities: new Array<number>(gen).fill(0),
          reason: "length" as FinishReason,
          steps: 0,
          forwardPasses: 0,
          tokensDenoised: 0
        }))
        yield* Stream.runForEach(generateStream(request), ({ index, step: event }) =>
          Effect.sync(() => {
            const choice = choices[index]!
            for (const c of event.committed) {
              choice.tokens[c.position] = c.token
              choice.probabilities[c.position] = c.probability
            }
            choice.steps = event.stepsDone
            choice.forwardPasses = event.forwardPasses
            choice.tokensDenoised += event.committed.length - event.filled
            if (event.reason !== null) choice.reason = event.reason
          })
        )
        for (const choice of choices) {
          if (choice.tokens.includes(-1)) {
            return yield* new EngineFailure({
              message: "a sequence finished with positions never committed",
              code: "VDIFF_INTERNAL"
            })
          }
        }
        return { choices }
      })

    const score = (request: ScoreRequest): Effect.Effect<ReadonlyArray<Scored>, GenerationError> =>
      Effect.scoped(
        Effect.gen(function* () {
          if (request.timeoutMs !== undefined && !(request.timeoutMs > 0)) {
            return yield* new InvalidRequestError({ message: "timeout must be positive", param: "timeout" })
          }
          const job = yield* enqueue(
            {
              n: 0,
              tokens: 0,
              timeoutMs: request.timeoutMs,
              promptTokens: Math.max(0, ...request.items.map((item) => item.canvas.length))
            },
            (queued): ScoreJob => ({ ...queued, kind: "score", request, scores: undefined })
          )
          // A caller that goes away before its forwards ran leaves them unrun.
          yield* Effect.addFinalizer(() =>
            Effect.sync(() => {
              if (unended.has(job)) job.cancelledAtStep = state.stepsTotal
            })
          )
          yield* watchDeadline(job)
          yield* Stream.runDrain(Mailbox.toStream(job.mailbox))
          if (job.scores === undefined) {
            return yield* new EngineFailure({ message: "a scoring ended without its scores", code: "VDIFF_INTERNAL" })
          }
          return job.scores
        })
      )

    const stats = Effect.gen(function* () {
      const queued = yield* queueLength
      return {
        waiting: queued + (head === undefined ? 0 : 1),
        running: running.length,
        runningSequences: runningSequences(),
        capacity: options.queueCapacity,
        maxConcurrent: options.maxConcurrent,
        draining: state.draining,
        stepsTotal: state.stepsTotal,
        sequenceStepsTotal: state.sequenceStepsTotal,
        tokensCommitted: state.tokensCommitted,
        requestsFinished: state.requestsFinished,
        cancelledTotal: state.cancelledTotal,
        stepsAfterCancelMax: state.stepsAfterCancelMax,
        averageBatchSize: state.stepsTotal === 0 ? 0 : state.sequenceStepsTotal / state.stepsTotal,
        averageTokensPerStep: state.sequenceStepsTotal === 0 ? 0 : state.tokensCommitted / state.sequenceStepsTotal
      }
    })

    const drain = (timeoutMs: number) =>
      Effect.gen(function* () {
        state.draining = true
        // The loop says so when it runs out of work; one already idle, waiting for a request, cannot.
        if (!(yield* busy)) yield* Deferred.succeed(drained, undefined)
        // The wait is made interruptible inside the timeout, so the deadline holds even where drain
        // itself cannot be interrupted (a finalizer at shutdown): the timeout runs the wait on a fiber of
        // its own, which it can interrupt.
        const inTime = yield* Deferred.await(drained).pipe(Effect.interruptible, Effect.timeoutOption(timeoutMs))
        if (Option.isNone(inTime)) {
          // The loop ends the leftovers itself before its next step, so no job is touched by two fibers;
          // then it idles and completes `drained`.
          state.stopping = new Draining({ message: "the server shut down before this request finished" })
          yield* Deferred.await(drained)
        }
      })

    return { generateStream, generate, score, stats, drain } satisfies SchedulerShape
  })

export const layer = (options: SchedulerOptions): Layer.Layer<Scheduler, never, Engine> => Layer.scoped(Scheduler, make(options))
