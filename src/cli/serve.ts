/**
 * `vdiff serve [flags]`: reads the settings (flags over VDIFF_* variables over defaults), checks that the
 * model directory is one, and runs the server under NodeRuntime.runMain, which turns SIGTERM/SIGINT into
 * the graceful shutdown of Server.run. Resolves with the exit status: 0 after a shutdown, 1 when the socket
 * or the model fails, 2 for bad settings (one line on stderr naming the flag).
 *
 * @since 0.1.0
 */
import { existsSync, writeSync } from "node:fs"
import { join } from "node:path"
import { NodeRuntime } from "@effect/platform-node"
import { Cause, Effect, Either, Exit } from "effect"
import * as Config from "../config/Config.js"
import * as Logging from "../server/logging.js"
import * as Server from "../server/Server.js"

/**
 * runMain answers the first SIGTERM or SIGINT with the graceful shutdown and leaves the next to Node, which
 * ends the process at once without a word. This says so on stderr first, and ends it with the status that
 * signal's default would (143, 130).
 */
const onSecondSignal = () => {
  const signals = ["SIGTERM", "SIGINT"] as const
  const first = () => {
    for (const signal of signals) process.removeListener(signal, first)
    for (const signal of signals) {
      process.once(signal, () => {
        writeSync(2, `vdiff serve: a second ${signal} during the shutdown: exiting now, without waiting for in-flight requests\n`)
        process.exit(signal === "SIGTERM" ? 143 : 130)
      })
    }
  }
  for (const signal of signals) process.once(signal, first)
}

export const serve = async (
  argv: ReadonlyArray<string>,
  env: Readonly<Record<string, string | undefined>> = process.env
): Promise<number> => {
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(Config.helpText() + "\n")
    return 0
  }
  const loaded = Config.load({ argv, env })
  if (Either.isLeft(loaded)) {
    process.stderr.write(`vdiff serve: ${loaded.left.message}\n`)
    return 2
  }
  const config = loaded.right
  if (!existsSync(join(config.model, "config.json"))) {
    // Named as the other settings' errors name theirs: the flag, or the variable it came from.
    const fromFlag = argv.some((arg) => arg === "--model" || arg.startsWith("--model="))
    const source = !fromFlag && env["VDIFF_MODEL"] !== undefined ? "VDIFF_MODEL (--model)" : "--model"
    process.stderr.write(`vdiff serve: ${source}: ${config.model} is not a model directory (it has no config.json)\n`)
    return 2
  }
  const { router } = await import("../openai/routes.js")
  const program = Server.run({ config, api: router }).pipe(
    Effect.tapDefect((cause) => Effect.logFatal("vdiff serve stopped on an unexpected error", cause)),
    Effect.provide(Logging.layer(config.logLevel))
  )
  return new Promise<number>((resolve) => {
    NodeRuntime.runMain(program, {
      // Server.run logs its failures as one line each; no pretty logger, no second report.
      disableErrorReporting: true,
      disablePrettyLogger: true,
      teardown: (exit, onExit) => {
        const code = Exit.isFailure(exit) && !Cause.isInterruptedOnly(exit.cause) ? 1 : 0
        resolve(code)
        onExit(code)
      }
    })
    // Only once runMain listens: a signal before it (while loading the modules) ends the process as Node
    // does, instead of arming a handler that would swallow it.
    onSecondSignal()
  })
}
