#!/usr/bin/env bash
# Checks the syntax of every ```mermaid block in docs/**/*.md (or in the Markdown files
# given as arguments) with the `mermaid` package itself, the renderer GitHub uses: each
# block goes through `mermaid.parse`, in Node, with jsdom standing in for the browser's
# DOM. A block that does not parse fails the run, named as file:line with the parser's
# message. No browser is needed (parse only, no rendering).
#
# Installs pinned versions of mermaid and jsdom once, from the npm registry, into
# target/mermaid-check (git-ignored; delete it to reinstall). Needs node >= 18 and npm.
#
#   docs/design/check-mermaid.sh                 # every docs/**/*.md
#   docs/design/check-mermaid.sh docs/design/*.md
set -euo pipefail

MERMAID_VERSION=11.17.2
JSDOM_VERSION=29.1.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="$root/target/mermaid-check"

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "check-mermaid: $tool is needed" >&2; exit 2; }
done

installed() {
  node -e "process.exit(require('$dir/node_modules/$1/package.json').version === '$2' ? 0 : 1)" 2>/dev/null
}

if ! installed mermaid "$MERMAID_VERSION" || ! installed jsdom "$JSDOM_VERSION"; then
  mkdir -p "$dir"
  cat >"$dir/package.json" <<EOF
{
  "name": "mermaid-check",
  "private": true,
  "dependencies": { "mermaid": "$MERMAID_VERSION", "jsdom": "$JSDOM_VERSION" }
}
EOF
  echo "check-mermaid: installing mermaid $MERMAID_VERSION and jsdom $JSDOM_VERSION into target/mermaid-check" >&2
  npm install --prefix "$dir" --no-audit --no-fund --loglevel=error >&2
fi

cat >"$dir/check.mjs" <<'EOF'
// Parses every ```mermaid block of the files named on the command line.
import { readFileSync } from 'node:fs';
import { JSDOM } from 'jsdom';

const dom = new JSDOM('<!doctype html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.DOMParser = dom.window.DOMParser;
globalThis.Element = dom.window.Element;
const mermaid = (await import('mermaid')).default;
mermaid.initialize({ startOnLoad: false });

let blocks = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  const lines = readFileSync(file, 'utf8').split('\n');
  let block = null;
  let start = 0;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (block === null) {
      if (line === '```mermaid') {
        block = [];
        start = i + 2; // the block's first line, 1-based
      }
      continue;
    }
    if (line.startsWith('```')) {
      blocks++;
      try {
        await mermaid.parse(block.join('\n'));
      } catch (error) {
        failed++;
        const message = String(error?.message ?? error);
        // The parser counts lines from the block's first: name the file's line.
        const at = /on line (\d+)/.exec(message);
        const line = at ? start + Number(at[1]) - 1 : start;
        console.error(`${file}:${line}: ${message}`);
      }
      block = null;
      continue;
    }
    block.push(lines[i]);
  }
  if (block !== null) {
    failed++;
    console.error(`${file}:${start}: a mermaid block is not closed`);
  }
}
console.log(`check-mermaid: ${blocks} blocks, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
EOF

if [ "$#" -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(find "$root/docs" -name '*.md' -type f | sort)
fi
# check.mjs lives beside its node_modules, so `import 'mermaid'` finds the install there.
node "$dir/check.mjs" "${files[@]}"
