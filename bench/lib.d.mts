// Types of bench/lib.mjs for the TypeScript benchmarks.
export declare const root: string
export declare const flags: <const D extends Record<string, string | boolean | undefined>>(
  defaults: D
) => { [K in keyof D]: D[K] extends boolean ? boolean : D[K] extends string ? string : string | undefined }
export declare const log: (message: string) => void
export declare const list: (text: string) => Array<string>
export declare const run: (command: string, args: ReadonlyArray<string>) => string
export declare const makeModel: (options: { preset: string; seed: number | string; out: string; dtype: string }) => string
export declare const fixed: (x: number | null | undefined, digits?: number) => string
export declare const table: (rows: ReadonlyArray<ReadonlyArray<unknown>>) => string
export declare const report: (text: string, json: string | undefined, results: unknown) => void
export declare const runMain: (main: () => void) => void
export declare const median: (xs: ReadonlyArray<number>) => number
