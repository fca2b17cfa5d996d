'use strict';

// Conformance with the installed packages' type definitions: `tsc --noEmit` over
// test/types/conformance.ts (the adapter assigned to @shopify/shopify-app-session-storage's
// SessionStorage and passed to shopifyApp({sessionStorage})) must compile, and
// test/types/negative.ts (a storage whose loadSession answers the wrong type) must not: the check
// has teeth.

const test = require('node:test');
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

test('TokenwalSessionStorage satisfies the installed SessionStorage interface (tsc --noEmit)', () => {
  const root = path.join(__dirname, '..');
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  const r = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.json', '--pretty', 'false'], { cwd: root, encoding: 'utf8' });
  const errors = r.stdout.split('\n').filter((l) => /error TS\d+/.test(l));
  const negative = fs.readFileSync(path.join(root, 'test/types/negative.ts'), 'utf8').split('\n');
  const expectLine = negative.findIndex((l) => l.includes('EXPECT-ERROR')) + 1;
  assert.deepEqual(
    errors.map((l) => l.replace(/\(\d+,\d+\).*/, (m) => m.slice(0, m.indexOf(',')) + ')')),
    [`test/types/negative.ts(${expectLine})`],
    `tsc must fail exactly on the negative check's line ${expectLine}; got:\n${r.stdout}${r.stderr}`,
  );
  assert.match(r.stdout, /Type 'Broken' is not assignable to type 'SessionStorage'/);
});
