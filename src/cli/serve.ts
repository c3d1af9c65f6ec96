/**
 * `vdiff serve [flags]`: reads the settings (flags over VDIFF_* variables over defaults), checks that the
 * model directory is one, and runs the server under NodeRuntime.runMain, which turns SIGTERM/SIGINT into
 * the graceful shutdown of Server.run. Resolves with the exit status: 0 after a shutdown, 1 when the socket
 * or the model fails, 2 for bad settings (one line on stderr naming the flag).
 *
 * @since 0.1.0
 */
import { existsSync } from "node:fs"
import { join } from "node:path"
import { NodeRuntime } from "@effect/platform-node"
import { Cause, Effect, Either, Exit } from "effect"
import * as Config from "../config/Config.js"
import * as Logging from "../server/logging.js"
import * as Server from "../server/Server.js"

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
    process.stderr.write(`vdiff serve: --model: ${config.model} is not a model directory (it has no config.json)\n`)
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
  })
}
