// Reproducible build of the contracts (Settlement.sol, NodeRegistry.sol) with solcjs (no
// network, no downloads).
//
//   node infra/contracts/build.mjs           compile and write <Contract>.json
//   node infra/contracts/build.mjs --check   compile; exit 1 if a committed artifact differs
//
// Paths are resolved relative to this script, so it runs from any working directory. The
// compiler and OpenZeppelin come from infra/node/node_modules (`npm ci --prefix infra/node`).
// Same inputs give byte-identical output: fixed settings, fixed source unit names, fixed key
// order, and the metadata hash covers only source contents.

import { createHash } from "node:crypto";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const CONTRACTS_DIR = dirname(fileURLToPath(import.meta.url));
const NODE_DIR = resolve(CONTRACTS_DIR, "..", "node");
const NODE_MODULES = join(NODE_DIR, "node_modules");
const CONTRACTS = ["Settlement", "NodeRegistry"];
const INSTALL_HINT = "install the npm tooling with `npm ci --prefix infra/node`";

function fail(message) {
  process.stderr.write(`build.mjs: ${message}\n`);
  process.exit(2);
}

function loadSolc() {
  const require = createRequire(join(NODE_DIR, "package.json"));
  try {
    return require("solc");
  } catch (err) {
    fail(`cannot load solc from ${NODE_MODULES} (${err.message}); ${INSTALL_HINT}`);
  }
}

// Only package imports (`@scope/pkg/...`) inside infra/node/node_modules are allowed.
function findImports(importPath) {
  if (!importPath.startsWith("@") || importPath.split("/").includes("..")) {
    return { error: `import not allowed: ${importPath}` };
  }
  const full = resolve(NODE_MODULES, importPath);
  if (!full.startsWith(NODE_MODULES + sep) || !existsSync(full)) {
    return { error: `import not found in ${NODE_MODULES}: ${importPath} (${INSTALL_HINT})` };
  }
  return { contents: readFileSync(full, "utf8") };
}

function compile(solc, name, source) {
  const sourceName = `${name}.sol`;
  const input = {
    language: "Solidity",
    sources: { [sourceName]: { content: source } },
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: "cancun",
      outputSelection: {
        [sourceName]: { [name]: ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] },
      },
    },
  };
  // solcjs may print ">>> Cannot retry compilation with SMT ..." on stdout; silence it so the
  // only output of this script is our own.
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = () => true;
  let raw;
  try {
    raw = solc.compile(JSON.stringify(input), { import: findImports });
  } finally {
    process.stdout.write = write;
  }
  const jsonStart = raw.indexOf("{");
  const output = JSON.parse(jsonStart > 0 ? raw.slice(jsonStart) : raw);
  const diagnostics = output.errors ?? [];
  const errors = diagnostics.filter((d) => d.severity === "error");
  for (const d of diagnostics) process.stderr.write(`${d.formattedMessage ?? d.message}\n`);
  if (errors.length > 0) fail(`compilation failed with ${errors.length} error(s)`);
  const contract = output.contracts?.[sourceName]?.[name];
  if (!contract) fail(`no ${name} contract in the compiler output`);
  return contract;
}

function buildArtifact(solc, name) {
  const sourceBytes = readFileSync(join(CONTRACTS_DIR, `${name}.sol`));
  const contract = compile(solc, name, sourceBytes.toString("utf8"));
  const artifact = {
    contractName: name,
    solcVersion: solc.version(),
    sourceSha256: createHash("sha256").update(sourceBytes).digest("hex"),
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
    deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
  };
  return `${JSON.stringify(artifact, null, 2)}\n`;
}

const args = process.argv.slice(2);
const unknown = args.filter((a) => a !== "--check");
if (unknown.length > 0) fail(`unknown argument(s): ${unknown.join(" ")} (usage: build.mjs [--check])`);

const solc = loadSolc();
let stale = 0;
for (const name of CONTRACTS) {
  const artifactPath = join(CONTRACTS_DIR, `${name}.json`);
  const text = buildArtifact(solc, name);
  if (args.includes("--check")) {
    const committed = existsSync(artifactPath) ? readFileSync(artifactPath, "utf8") : null;
    if (committed !== text) {
      process.stderr.write(
        `build.mjs: ${artifactPath} is out of date; run \`node infra/contracts/build.mjs\`\n`,
      );
      stale += 1;
    } else {
      process.stdout.write(`${artifactPath} is up to date\n`);
    }
  } else {
    writeFileSync(artifactPath, text);
    process.stdout.write(`wrote ${artifactPath}\n`);
  }
}
if (stale > 0) process.exit(1);
