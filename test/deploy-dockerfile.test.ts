/**
 * The Dockerfile and .dockerignore, checked without a container builder (none runs on these machines):
 * the lint (deploy/scripts/dockerfile-run.ts: the hadolint rules that apply, non-root, exec-form entry
 * point, health check, pinned bases), with negative controls; the build context's contents; the targets'
 * bases and settings. CI also runs every step of the cpu target on the plain machine and starts its entry
 * point (deploy/scripts/dockerfile-run.ts, from .ci/run).
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { Either } from "effect"
import { describe, expect, it } from "vitest"
import { dockerignore, lintDockerfile, parseDockerfile, parseEnv, stagesOf, substitute } from "../deploy/scripts/dockerfile-run.js"
import * as Config from "../src/config/Config.js"

const root = join(import.meta.dirname, "..")
const dockerfile = readFileSync(join(root, "Dockerfile"), "utf8")
const { globals, stages } = stagesOf(parseDockerfile(dockerfile))
const stage = (name: string) => {
  const found = stages.find((s) => s.name === name)
  expect(found, name).toBeDefined()
  return found!
}
const instructions = (name: string, keyword: string) => stage(name).instructions.filter((i) => i.keyword === keyword)
const envOf = (name: string) => Object.assign({}, ...instructions(name, "ENV").map((i) => parseEnv(i.args))) as Record<string, string>

describe("Dockerfile", () => {
  it("passes the lint", () => {
    expect(lintDockerfile(dockerfile, root)).toEqual([])
  })

  it("the lint catches what it is for (negative controls)", () => {
    const bad = [
      "ARG V=1",
      "FROM node:latest AS build",
      "WORKDIR app",
      "RUN cd /tmp && sudo apt-get install curl",
      "RUN npm install",
      "COPY package.json tsconfig.json app",
      "COPY test test",
      "COPY nowhere x",
      "FROM debian AS final",
      "USER root",
      "ENV VDIFF_PORT=8000",
      "EXPOSE 80",
      "ENTRYPOINT node bin/vdiff.js serve"
    ].join("\n")
    const problems = lintDockerfile(bad, root).join("\n")
    for (const expected of [
      "FROM node:latest is not pinned",
      "FROM debian is not pinned",
      "WORKDIR app is not absolute",
      "cd in RUN",
      "sudo in RUN",
      "apt-get install without -y",
      "apt-get install without --no-install-recommends",
      "apt lists not removed",
      "npm install; use npm ci",
      "COPY of several sources into app",
      "COPY test: excluded by .dockerignore",
      "COPY nowhere: not in the build context",
      "USER root is not a numeric non-root user",
      "no HEALTHCHECK",
      "EXPOSE 80 is not VDIFF_PORT 8000",
      "ENTRYPOINT in shell form"
    ]) {
      expect(problems).toContain(expected)
    }
  })

  it("a CPU image on Debian 12's Node and a CUDA image on the CUDA runtime base, built on the devel one", () => {
    const resolved = (name: string) => substitute(stage(name).from, globals)
    expect(resolved("cpu")).toMatch(/^node:20\.\d+\.\d+-bookworm-slim$/)
    expect(resolved("build-cpu")).toMatch(/^node:20\.\d+\.\d+-bookworm$/)
    expect(resolved("cuda")).toMatch(/^nvidia\/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+$/)
    expect(resolved("build-cuda")).toMatch(/^nvidia\/cuda:\d+\.\d+\.\d+-devel-ubuntu\d+\.\d+$/)
    // The Node the project supports (package.json engines).
    const engines = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).engines.node as string
    expect(engines).toMatch(/^>=20\./)
    // The CPU build leaves CUDA out; the CUDA build has nvcc and builds it.
    expect(instructions("build-cpu", "RUN").map((i) => i.args)).toContain("npm run build:native -- --CDVDIFF_CUDA=OFF")
    expect(instructions("build-cuda", "RUN").map((i) => i.args)).toContain("npm run build:native")
  })

  for (const target of ["cpu", "cuda"]) {
    it(`${target}: vdiff serve as the entry point, configured by VDIFF_* variables the server accepts, as uid 10001`, () => {
      expect(JSON.parse(instructions(target, "ENTRYPOINT")[0]!.args)).toEqual(["node", "/app/bin/vdiff.js", "serve"])
      expect(instructions(target, "USER")[0]!.args).toBe("10001:10001")
      const env = envOf(target)
      const vdiff = Object.fromEntries(Object.entries(env).filter(([name]) => name.startsWith("VDIFF_")))
      const loaded = Config.load({ argv: [], env: vdiff })
      expect(Either.isRight(loaded), JSON.stringify(vdiff)).toBe(true)
      if (Either.isRight(loaded)) {
        expect(loaded.right.host).toBe("0.0.0.0")
        expect(instructions(target, "EXPOSE")[0]!.args).toBe(String(loaded.right.port))
        if (target === "cuda") expect(loaded.right.device).toBe("cuda")
      }
      expect(instructions(target, "HEALTHCHECK")[0]!.args).toContain("/health/ready")
      // The runtime image gets the built package and the embedded model, nothing of the build's tools.
      const copied = instructions(target, "COPY").map((i) => i.args.split(/\s+/).at(-2))
      expect(copied).toEqual(expect.arrayContaining(["/app/dist", "/app/build/native/Release", "/app/node_modules", "/app/models"]))
      expect(copied).not.toContain("/app/native")
      expect(copied).not.toContain("/app/src")
    })
  }

  it(".dockerignore sends only the sources, the lock file and the embedded model", () => {
    const ignored = dockerignore(readFileSync(join(root, ".dockerignore"), "utf8"))
    for (const path of [
      "package.json",
      "package-lock.json",
      "native/src/core/backend.h",
      "src/main.ts",
      "bin/vdiff.js",
      "models/shakespeare/config.json"
    ]) {
      expect(ignored(path), path).toBe(false)
    }
    for (const path of [
      "node_modules/effect/package.json",
      "build/native/Release/vdiff.node",
      "dist/main.js",
      "test/golden.test.ts",
      ".git/HEAD",
      "models/other/model.safetensors",
      "src/debug.log"
    ]) {
      expect(ignored(path), path).toBe(true)
    }
  })
})
