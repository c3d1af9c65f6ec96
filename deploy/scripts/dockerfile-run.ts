/**
 * Runs the Dockerfile's steps for one target on this machine, where no container builder runs (no Docker
 * daemon, no registry): the proof that its commands work, for CI. Each stage gets a directory that stands
 * for its file system root; the stages a target needs run in file order:
 *
 *   ARG / ENV        values, substituted into what follows (${NAME});
 *   FROM image       the base is this machine, which must be what the image is (node:<version>-bookworm*:
 *                    Debian 12 and Node of that major version); FROM stage starts from that stage's files;
 *   WORKDIR, COPY    into the stage's directory; COPY honours .dockerignore, COPY --from reads another
 *                    stage's directory;
 *   RUN              /bin/sh -c in WORKDIR with the stage's ARG and ENV values, as root (apt-get and
 *                    useradd run for real);
 *   USER, EXPOSE, HEALTHCHECK, ENTRYPOINT   recorded, then checked on the finished target: its entry
 *                    point is started as that user with the image's ENV (VDIFF_PORT set to a free port,
 *                    as `docker run -e` would), must answer readiness, the HEALTHCHECK command and a
 *                    completion, must run as the USER, and must exit 0 on SIGTERM.
 *
 * --reuse-native DIR replaces the one RUN step that compiles the engine (npm run build:native) with a
 * copy of DIR/Release/vdiff.node, the engine CI has already built from the same sources: every other step
 * runs. Only the cpu target can run here (the cuda target's bases are CUDA images).
 *
 *   node --import tsx deploy/scripts/dockerfile-run.ts [--target cpu] [--reuse-native build/native] [--keep]
 */
import { spawn, spawnSync } from "node:child_process"
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs"
import { createServer } from "node:net"
import { tmpdir } from "node:os"
import { basename, dirname, isAbsolute, join, relative, resolve } from "node:path"

export interface Instruction {
  readonly keyword: string
  readonly args: string
  readonly line: number
}

/** The Dockerfile's instructions: continuation lines joined, comments and blank lines dropped. */
export const parseDockerfile = (text: string): Array<Instruction> => {
  const instructions: Array<Instruction> = []
  let pending = ""
  let start = 0
  text.split("\n").forEach((raw, i) => {
    const line = raw.trimEnd()
    if (pending === "" && (line.trim() === "" || line.trim().startsWith("#"))) return
    if (pending !== "" && line.trim().startsWith("#")) return
    if (pending === "") start = i + 1
    if (line.endsWith("\\")) {
      pending += line.slice(0, -1) + " "
      return
    }
    const whole = (pending + line).trim()
    pending = ""
    const space = whole.search(/\s/)
    instructions.push({ keyword: whole.slice(0, space).toUpperCase(), args: whole.slice(space + 1).trim(), line: start })
  })
  return instructions
}

export interface Stage {
  readonly name: string
  readonly from: string
  readonly instructions: Array<Instruction>
}

/** Global ARG defaults and the stages (FROM … AS name … up to the next FROM). */
export const stagesOf = (instructions: ReadonlyArray<Instruction>) => {
  const globals: Record<string, string> = {}
  const stages: Array<Stage> = []
  for (const instruction of instructions) {
    if (instruction.keyword === "FROM") {
      const [from, as, name] = instruction.args.split(/\s+/)
      if (as?.toUpperCase() !== "AS" || name === undefined) throw new Error(`line ${instruction.line}: every stage needs a name`)
      stages.push({ name, from: substitute(from!, globals), instructions: [] })
    } else if (stages.length === 0) {
      if (instruction.keyword !== "ARG") throw new Error(`line ${instruction.line}: only ARG may come before FROM`)
      const [name, value] = instruction.args.split("=")
      globals[name!] = value ?? ""
    } else {
      stages.at(-1)!.instructions.push(instruction)
    }
  }
  return { globals, stages }
}

/** ${NAME} and $NAME from `values`; unknown names are left as they are (the shell may know them). */
export const substitute = (text: string, values: Readonly<Record<string, string>>): string =>
  text.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (whole, a, b) => values[a ?? b] ?? whole)

/** `A=1 B="two words"` → { A: "1", B: "two words" }. */
export const parseEnv = (args: string): Record<string, string> => {
  const values: Record<string, string> = {}
  for (const match of args.matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("([^"]*)"|\S*)/g)) values[match[1]!] = match[3] ?? match[2]!
  return values
}

/** COPY's flags and paths. */
export const parseCopy = (args: string) => {
  const words = args.split(/\s+/)
  const flags = Object.fromEntries(
    words.filter((w) => w.startsWith("--")).map((w) => [w.slice(2, w.indexOf("=")), w.slice(w.indexOf("=") + 1)] as const)
  )
  const paths = words.filter((w) => !w.startsWith("--"))
  return { from: flags["from"], sources: paths.slice(0, -1), destination: paths.at(-1)! }
}

// --- .dockerignore ------------------------------------------------------------------------------------

const globToRegExp = (pattern: string): RegExp => {
  let source = ""
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!
    if (c === "*" && pattern[i + 1] === "*") {
      source += ".*"
      i++
      if (pattern[i + 1] === "/") i++
    } else if (c === "*") source += "[^/]*"
    else if (c === "?") source += "[^/]"
    else source += c.replace(/[.+^${}()|[\]\\]/g, "\\$&")
  }
  return new RegExp(`^${source}$`)
}

/** Docker's rule: a pattern excludes a path it matches or whose parent directory it matches; the last matching pattern decides. */
export const dockerignore = (text: string) => {
  const rules = text
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"))
    .map((line) => {
      const negated = line.startsWith("!")
      const pattern = (negated ? line.slice(1) : line).replace(/^\/+/, "").replace(/\/+$/, "")
      return { negated, regexp: globToRegExp(pattern) }
    })
  return (path: string): boolean => {
    const parts = path.split("/")
    const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join("/"))
    let excluded = false
    for (const rule of rules) if (prefixes.some((p) => rule.regexp.test(p))) excluded = !rule.negated
    return excluded
  }
}

// --- lint ---------------------------------------------------------------------------------------------

/**
 * The checks hadolint would make that apply here (hadolint itself is neither in Debian nor runnable from
 * npm without a download), plus vdiff's own: base images pinned (DL3006/DL3007), absolute WORKDIR
 * (DL3000), no `cd`, `sudo` or `apt-get upgrade` in RUN (DL3003/DL3004/DL3005), apt-get install with -y
 * and --no-install-recommends and the lists removed in the same RUN (DL3014/DL3015/DL3009), COPY of
 * several sources into a directory ending in / (DL3021), npm ci rather than npm install; each final
 * target (a stage no other stage builds on) runs as a numeric non-root USER (DL3002), has an exec-form
 * ENTRYPOINT, EXPOSEs its VDIFF_PORT and has a HEALTHCHECK; COPY sources exist and are not excluded by
 * .dockerignore. Returns the problems, "line N: …".
 */
export const lintDockerfile = (text: string, context: string): Array<string> => {
  const problems: Array<string> = []
  const { globals, stages } = stagesOf(parseDockerfile(text))
  const ignored = dockerignore(existsSync(join(context, ".dockerignore")) ? readFileSync(join(context, ".dockerignore"), "utf8") : "")
  const names = new Set(stages.map((s) => s.name))
  const usedAsBase = new Set(
    stages.flatMap((s) => [s.from, ...s.instructions.filter((i) => i.keyword === "COPY").map((i) => parseCopy(i.args).from ?? "")])
  )
  for (const stage of stages) {
    if (!names.has(stage.from)) {
      const [, tag] = stage.from.split(":")
      if (tag === undefined || tag === "latest" || stage.from.includes("$"))
        problems.push(`stage ${stage.name}: FROM ${stage.from} is not pinned to a version`)
    }
    const env: Record<string, string> = {}
    let user: string | undefined
    let entrypoint = false
    let healthcheck = false
    const expose: Array<string> = []
    for (const i of stage.instructions) {
      const at = `line ${i.line}`
      const args = substitute(i.args, { ...globals, ...env })
      if (i.keyword === "ENV") Object.assign(env, parseEnv(args))
      if (i.keyword === "WORKDIR" && !args.startsWith("/")) problems.push(`${at}: WORKDIR ${args} is not absolute`)
      if (i.keyword === "USER") user = args
      if (i.keyword === "EXPOSE") expose.push(...args.split(/\s+/))
      if (i.keyword === "HEALTHCHECK") healthcheck = true
      if (i.keyword === "ENTRYPOINT") {
        entrypoint = true
        if (!args.startsWith("[")) problems.push(`${at}: ENTRYPOINT in shell form (signals would go to the shell)`)
      }
      if (i.keyword === "RUN") {
        if (/(^|&&|;)\s*cd\s/.test(args)) problems.push(`${at}: cd in RUN; use WORKDIR`)
        if (/\bsudo\b/.test(args)) problems.push(`${at}: sudo in RUN`)
        if (/apt-get\s+(dist-)?upgrade/.test(args)) problems.push(`${at}: apt-get upgrade in RUN`)
        if (/apt-get\s+install/.test(args)) {
          if (!/apt-get\s+install[^&;]*\s-y\b/.test(args)) problems.push(`${at}: apt-get install without -y`)
          if (!/--no-install-recommends/.test(args)) problems.push(`${at}: apt-get install without --no-install-recommends`)
          if (!/rm -rf \/var\/lib\/apt\/lists/.test(args)) problems.push(`${at}: apt lists not removed in the same RUN`)
        }
        if (/\bnpm (install|i)\b/.test(args)) problems.push(`${at}: npm install; use npm ci (the lock file)`)
      }
      if (i.keyword === "COPY") {
        const copy = parseCopy(args)
        if (copy.sources.length > 1 && !copy.destination.endsWith("/"))
          problems.push(`${at}: COPY of several sources into ${copy.destination}, not a directory/`)
        if (copy.from === undefined) {
          for (const source of copy.sources) {
            if (!existsSync(join(context, source))) problems.push(`${at}: COPY ${source}: not in the build context`)
            else if (ignored(source)) problems.push(`${at}: COPY ${source}: excluded by .dockerignore`)
          }
        } else if (!names.has(copy.from) && !copy.from.includes(":")) problems.push(`${at}: COPY --from=${copy.from}: no such stage`)
      }
    }
    if (usedAsBase.has(stage.name)) continue
    // A final target.
    if (user === undefined || !/^[1-9]\d*(:[1-9]\d*)?$/.test(user))
      problems.push(`stage ${stage.name}: USER ${user ?? "(none)"} is not a numeric non-root user`)
    if (!entrypoint) problems.push(`stage ${stage.name}: no ENTRYPOINT`)
    if (!healthcheck) problems.push(`stage ${stage.name}: no HEALTHCHECK`)
    if (env["VDIFF_PORT"] === undefined || !expose.includes(env["VDIFF_PORT"]))
      problems.push(`stage ${stage.name}: EXPOSE ${expose.join(" ")} is not VDIFF_PORT ${env["VDIFF_PORT"]}`)
  }
  return problems
}

// --- running it ---------------------------------------------------------------------------------------

interface Built {
  readonly root: string
  user: string | undefined
  entrypoint: Array<string> | undefined
  healthcheck: Array<string> | undefined
  expose: Array<number>
  env: Record<string, string>
}

const log = (line: string) => process.stderr.write(`[dockerfile-run] ${line}\n`)

/** The stages `target` needs, in file order. */
const needed = (stages: ReadonlyArray<Stage>, target: string): Array<Stage> => {
  const names = new Set<string>()
  const visit = (name: string) => {
    const stage = stages.find((s) => s.name === name)
    if (stage === undefined || names.has(name)) return
    names.add(name)
    visit(stage.from)
    for (const i of stage.instructions) if (i.keyword === "COPY") visit(parseCopy(i.args).from ?? "")
  }
  visit(target)
  if (!names.has(target)) throw new Error(`no stage named ${target}`)
  return stages.filter((s) => names.has(s.name))
}

/** This machine stands for the base image: Debian 12 and the Node major of node:<version>-bookworm*. */
const checkBase = (image: string) => {
  const match = /^node:(\d+)[\d.]*-bookworm(-slim)?$/.exec(image)
  if (match === null) throw new Error(`FROM ${image}: only node:<version>-bookworm images can be stood in for by this machine`)
  const osRelease = readFileSync("/etc/os-release", "utf8")
  if (!/^VERSION_ID="12"$/m.test(osRelease) || !/^ID=debian$/m.test(osRelease))
    throw new Error(`FROM ${image}: this machine is not Debian 12`)
  const major = process.versions.node.split(".")[0]
  if (major !== match[1]) throw new Error(`FROM ${image}: this machine runs Node ${process.versions.node}`)
}

const inside = (root: string, workdir: string, path: string) => join(root, isAbsolute(path) ? path : join(workdir, path))

const copyInto = (source: string, destination: string, keep: (relativePath: string) => boolean, base: string) => {
  if (statSync(source).isDirectory()) {
    mkdirSync(destination, { recursive: true })
    for (const entry of readdirSync(source)) {
      const from = join(source, entry)
      if (!keep(relative(base, from))) continue
      copyInto(from, join(destination, entry), keep, base)
    }
  } else {
    mkdirSync(dirname(destination), { recursive: true })
    cpSync(source, destination)
  }
}

export interface RunOptions {
  readonly dockerfile: string
  readonly context: string
  readonly target: string
  readonly reuseNative?: string
  readonly keep?: boolean
}

export const runDockerfile = async (options: RunOptions): Promise<void> => {
  if (process.getuid?.() !== 0) throw new Error("run as root: the steps install packages and add a user, as they do in an image")
  const problems = lintDockerfile(readFileSync(options.dockerfile, "utf8"), options.context)
  if (problems.length > 0) throw new Error(`the Dockerfile does not pass its checks:\n${problems.join("\n")}`)
  const { globals, stages } = stagesOf(parseDockerfile(readFileSync(options.dockerfile, "utf8")))
  const ignored = dockerignore(
    existsSync(join(options.context, ".dockerignore")) ? readFileSync(join(options.context, ".dockerignore"), "utf8") : ""
  )
  const work = mkdtempSync(join(tmpdir(), "vdiff-dockerfile-"))
  chmodSync(work, 0o755)
  const built = new Map<string, Built>()
  try {
    for (const stage of needed(stages, options.target)) {
      const root = join(work, stage.name)
      const parent = built.get(stage.from)
      if (parent !== undefined) cpSync(parent.root, root, { recursive: true })
      else {
        checkBase(stage.from)
        mkdirSync(root, { recursive: true })
      }
      const state: Built = {
        root,
        user: parent?.user,
        entrypoint: parent?.entrypoint,
        healthcheck: parent?.healthcheck,
        expose: [],
        env: { ...parent?.env }
      }
      const args: Record<string, string> = {}
      let workdir = "/"
      log(`stage ${stage.name} (FROM ${stage.from}) in ${root}`)
      for (const instruction of stage.instructions) {
        const values = { ...globals, ...args, ...state.env }
        const text = substitute(instruction.args, values)
        switch (instruction.keyword) {
          case "ARG": {
            const [name, value] = instruction.args.split("=")
            args[name!] = value ?? globals[name!] ?? ""
            break
          }
          case "ENV":
            Object.assign(state.env, parseEnv(text))
            break
          case "WORKDIR":
            workdir = isAbsolute(text) ? text : join(workdir, text)
            mkdirSync(join(root, workdir), { recursive: true })
            break
          case "COPY": {
            const copy = parseCopy(text)
            for (const source of copy.sources) {
              const destination = inside(root, workdir, copy.destination)
              const into = copy.sources.length > 1 || copy.destination.endsWith("/") || copy.destination === "."
              if (copy.from !== undefined) {
                const from = built.get(copy.from)
                if (from === undefined) throw new Error(`line ${instruction.line}: COPY --from=${copy.from}: no such stage`)
                const path = join(from.root, source)
                copyInto(path, into && !statSync(path).isDirectory() ? join(destination, basename(source)) : destination, () => true, path)
              } else {
                const path = resolve(options.context, source)
                if (ignored(relative(options.context, path)))
                  throw new Error(`line ${instruction.line}: ${source} is excluded by .dockerignore`)
                const keep = (rel: string) => !ignored(rel)
                copyInto(
                  path,
                  into && !statSync(path).isDirectory() ? join(destination, basename(source)) : destination,
                  keep,
                  options.context
                )
              }
            }
            break
          }
          case "RUN": {
            const cwd = join(root, workdir)
            if (options.reuseNative !== undefined && /^npm run build:native\b/.test(text)) {
              const addon = join(resolve(options.reuseNative), "Release", "vdiff.node")
              log(`RUN ${text}: reusing ${addon} (built by CI from the same native/ sources)`)
              mkdirSync(join(cwd, "build", "native", "Release"), { recursive: true })
              cpSync(addon, join(cwd, "build", "native", "Release", "vdiff.node"))
              break
            }
            log(`RUN ${text}`)
            const started = Date.now()
            const result = spawnSync("/bin/sh", ["-c", text], {
              cwd,
              stdio: ["ignore", "inherit", "inherit"],
              env: { ...process.env, ...args, ...state.env, DEBIAN_FRONTEND: "noninteractive" }
            })
            if (result.status !== 0) throw new Error(`line ${instruction.line}: RUN ${text}: exit ${result.status}`)
            log(`  done in ${((Date.now() - started) / 1000).toFixed(1)} s`)
            // In an image, removing the apt lists saves space; on this machine it would leave the next
            // apt-get install without package lists: fetch them again.
            if (/rm -rf \/var\/lib\/apt\/lists/.test(text)) spawnSync("apt-get", ["update", "-qq"], { stdio: "ignore" })
            break
          }
          case "USER":
            state.user = text
            break
          case "EXPOSE":
            state.expose.push(...text.split(/\s+/).map((port) => Number(port.split("/")[0])))
            break
          case "HEALTHCHECK": {
            const command = /\bCMD\s+(\[.*\])\s*$/.exec(instruction.args)
            state.healthcheck = command === null ? undefined : (JSON.parse(command[1]!) as Array<string>)
            break
          }
          case "ENTRYPOINT":
            state.entrypoint = JSON.parse(instruction.args) as Array<string>
            break
          case "LABEL":
          case "CMD":
            break
          default:
            throw new Error(`line ${instruction.line}: ${instruction.keyword} is not supported here`)
        }
      }
      built.set(stage.name, state)
    }
    await smokeTest(built.get(options.target)!)
    log(
      `target ${options.target}: every step ran; the entry point served as user ${built.get(options.target)!.user} and exited 0 on SIGTERM`
    )
  } finally {
    if (options.keep === true) log(`kept ${work}`)
    else rmSync(work, { recursive: true, force: true })
  }
}

const freePort = () =>
  new Promise<number>((done, fail) => {
    const server = createServer()
    server.once("error", fail)
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number }
      server.close(() => done(port))
    })
  })

/** Absolute paths of the image that exist in the stage's directory are mapped into it. */
const mapPaths = (root: string, words: ReadonlyArray<string>) =>
  words.map((w) => (w.startsWith("/") && existsSync(join(root, w)) ? join(root, w) : w))

/** Starts the target's entry point as its USER and checks that it serves and drains. */
const smokeTest = async (image: Built) => {
  if (image.entrypoint === undefined) throw new Error("the target has no ENTRYPOINT")
  if (image.user === undefined || /^(0|root)(:|$)/.test(image.user)) throw new Error(`the target runs as root (USER ${image.user})`)
  const [uid, gid = uid] = image.user.split(":")
  if (!/^\d+$/.test(uid!) || !/^\d+$/.test(gid!)) throw new Error(`USER ${image.user}: give numeric ids`)
  const port = await freePort()
  const env = {
    PATH: process.env["PATH"] ?? "/usr/bin:/bin",
    HOME: "/nonexistent",
    ...image.env,
    VDIFF_PORT: String(port),
    VDIFF_HOST: "127.0.0.1"
  }
  if (image.env["VDIFF_PORT"] === undefined || !image.expose.includes(Number(image.env["VDIFF_PORT"]))) {
    throw new Error(`EXPOSE ${image.expose.join(" ")} is not the image's VDIFF_PORT ${image.env["VDIFF_PORT"]}`)
  }
  const as = ["setpriv", `--reuid=${uid}`, `--regid=${gid}`, "--clear-groups", "--"]
  const command = mapPaths(image.root, image.entrypoint)
  log(`starting ${command.join(" ")} as ${uid}:${gid} on port ${port}`)
  const child = spawn(as[0]!, [...as.slice(1), ...command], { cwd: image.root, env, stdio: ["ignore", "pipe", "pipe"] })
  let output = ""
  child.stdout.on("data", (chunk) => (output += String(chunk)))
  child.stderr.on("data", (chunk) => (output += String(chunk)))
  const exited = new Promise<number | null>((done) => child.on("exit", (code) => done(code)))
  try {
    const url = `http://127.0.0.1:${port}`
    const start = Date.now()
    for (;;) {
      if (child.exitCode !== null) throw new Error(`the entry point exited ${child.exitCode}:\n${output}`)
      if (Date.now() - start > 180_000) throw new Error(`not ready in 180 s:\n${output}`)
      const ready = await fetch(url + "/health/ready").then(
        (r) => r.status,
        () => 0
      )
      if (ready === 200) break
      await new Promise((done) => setTimeout(done, 200))
    }
    const status = readFileSync(`/proc/${child.pid}/status`, "utf8")
    // setpriv execs the server: the process is the server itself.
    if (!new RegExp(`^Uid:\\s+${uid}\\s`, "m").test(status))
      throw new Error(`the server does not run as ${uid}: ${/^Uid:.*$/m.exec(status)?.[0]}`)
    if (image.healthcheck !== undefined) {
      const check = spawnSync(as[0]!, [...as.slice(1), ...mapPaths(image.root, image.healthcheck)], {
        cwd: image.root,
        env,
        stdio: "inherit"
      })
      if (check.status !== 0) throw new Error(`HEALTHCHECK exited ${check.status}`)
      log("HEALTHCHECK passed")
    }
    const response = await fetch(url + "/v1/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: "ROMEO:", max_tokens: 8 })
    })
    const body = (await response.json()) as { choices?: Array<{ text: string }> }
    if (response.status !== 200 || typeof body.choices?.[0]?.text !== "string")
      throw new Error(`completion: ${response.status} ${JSON.stringify(body)}`)
    log(`completion: ${JSON.stringify(body.choices[0].text)}`)
    child.kill("SIGTERM")
    const code = await exited
    if (code !== 0) throw new Error(`exit ${code} on SIGTERM:\n${output}`)
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL")
  }
}

const isMain = process.argv[1] !== undefined && import.meta.filename === resolve(process.argv[1])
if (isMain) {
  const args = process.argv.slice(2)
  const flag = (name: string) => {
    const i = args.indexOf(`--${name}`)
    return i >= 0 ? args[i + 1] : undefined
  }
  const context = resolve(import.meta.dirname, "..", "..")
  const reuseNative = flag("reuse-native")
  await runDockerfile({
    dockerfile: join(context, "Dockerfile"),
    context,
    target: flag("target") ?? "cpu",
    ...(reuseNative === undefined ? {} : { reuseNative }),
    keep: args.includes("--keep")
  })
}
