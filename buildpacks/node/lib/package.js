// What the node buildpack needs to know of a package.json, asked of the build image's own
// Node.js (so the buildpack needs nothing else):
//
//   node package.js facts PACKAGE_JSON          shell assignments: has_build, engines, name
//   node package.js satisfies VERSION RANGE     exit 0 if VERSION is in the semver RANGE,
//                                               1 if not, 2 if RANGE cannot be read
//   node package.js launch PACKAGE_JSON OUT     writes launch.toml with the web process
'use strict';

const fs = require('fs');

function fail(message) {
  process.stderr.write(message + '\n');
  process.exit(1);
}

function readPackage(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    fail(`${file}: ${e.message}`);
  }
  let pkg;
  try {
    pkg = JSON.parse(text);
  } catch (e) {
    fail(`${file}: not valid JSON: ${e.message}`);
  }
  if (pkg === null || typeof pkg !== 'object' || Array.isArray(pkg)) {
    fail(`${file}: not a JSON object`);
  }
  for (const key of ['scripts', 'engines']) {
    if (pkg[key] !== undefined && (typeof pkg[key] !== 'object' || pkg[key] === null)) {
      fail(`${file}: "${key}" is not an object`);
    }
  }
  return pkg;
}

// Single-quoted for a POSIX shell.
function shellQuote(value) {
  return "'" + String(value).replace(/'/g, "'\\''") + "'";
}

// A TOML basic string.
function tomlString(value) {
  return JSON.stringify(String(value));
}

// ---- semver ranges (the subset package.json "engines" use) ----

function parseVersion(text) {
  const m = /^v?(\d+)\.(\d+)\.(\d+)/.exec(text.trim());
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : null;
}

function compare(a, b) {
  for (let i = 0; i < 3; i++) {
    if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
  }
  return 0;
}

// A partial version ("18", "18.2", "18.x", "*") as its numbers, null for wildcards.
function parsePartial(text) {
  const parts = text.replace(/^[=v]+/, '').split('.');
  if (parts.length > 3) return undefined;
  const nums = [];
  for (const part of parts) {
    const bare = part.split(/[-+]/)[0];
    if (bare === '' || bare === 'x' || bare === 'X' || bare === '*') break;
    if (!/^\d+$/.test(bare)) return undefined;
    nums.push(Number(bare));
  }
  return nums;
}

// The [low, high) bounds of one comparator; high null: unbounded.
function bounds(comparator) {
  const m = /^(\^|~>?|>=|<=|>|<|=)?(.*)$/.exec(comparator);
  const op = m[1] || '';
  const nums = parsePartial(m[2]);
  if (nums === undefined) return undefined;
  const pad = (n) => [n[0] || 0, n[1] || 0, n[2] || 0];
  const bump = (n, i) => {
    const out = pad(n).slice();
    out[i] += 1;
    for (let j = i + 1; j < 3; j++) out[j] = 0;
    return out;
  };
  const any = [[0, 0, 0], null];
  if (nums.length === 0) return op === '<' || op === '>' ? [[0, 0, 0], [0, 0, 0]] : any;
  const exactHigh = nums.length === 3 ? bump(nums, 2) : bump(nums, nums.length - 1);
  switch (op) {
    case '':
    case '=':
      return [pad(nums), exactHigh];
    case '>=':
      return [pad(nums), null];
    case '>':
      return [exactHigh, null];
    case '<':
      return [[0, 0, 0], pad(nums)];
    case '<=':
      return [[0, 0, 0], exactHigh];
    case '~':
    case '~>':
      return [pad(nums), bump(nums, nums.length >= 2 ? 1 : 0)];
    case '^': {
      const first = nums.findIndex((n, i) => n !== 0 || i === nums.length - 1);
      return [pad(nums), bump(nums, Math.max(first, 0))];
    }
  }
  return undefined;
}

// Whether version (a [major, minor, patch]) is in range; undefined when range is not one.
function satisfies(version, range) {
  const alternatives = range.split('||');
  let unreadable = false;
  for (let alt of alternatives) {
    alt = alt.trim().replace(/(\^|~>?|>=|<=|>|<|=)\s+/g, '$1');
    let comparators;
    const hyphen = /^(\S+)\s+-\s+(\S+)$/.exec(alt);
    if (hyphen) {
      comparators = ['>=' + hyphen[1], '<=' + hyphen[2]];
    } else {
      comparators = alt === '' ? ['*'] : alt.split(/\s+/);
    }
    let ok = true;
    for (const c of comparators) {
      const b = bounds(c);
      if (b === undefined) {
        unreadable = true;
        ok = false;
        break;
      }
      if (compare(version, b[0]) < 0 || (b[1] !== null && compare(version, b[1]) >= 0)) {
        ok = false;
      }
    }
    if (ok) return true;
  }
  return unreadable ? undefined : false;
}

// ---- the web process: `npm start` without npm ----

// A command line with nothing a shell would interpret runs directly (the run image may
// have no shell); anything else runs through sh, as npm runs scripts.
function commandOf(line) {
  if (/^[A-Za-z0-9_./:=@%+,\s-]+$/.test(line)) {
    return line.trim().split(/\s+/);
  }
  return ['sh', '-c', line];
}

function webCommand(pkg) {
  const start = pkg.scripts && pkg.scripts.start;
  if (typeof start === 'string' && start.trim() !== '') {
    return { command: commandOf(start), why: `the start script (${start})` };
  }
  if (typeof pkg.main === 'string' && pkg.main !== '') {
    const candidates = [pkg.main, pkg.main + '.js', pkg.main + '/index.js'];
    const found = candidates.find((p) => fs.existsSync(p) && fs.statSync(p).isFile());
    if (found) return { command: ['node', pkg.main], why: `"main" (${pkg.main})` };
  }
  for (const file of ['server.js', 'index.js']) {
    if (fs.existsSync(file)) return { command: ['node', file], why: file };
  }
  return null;
}

const [cmd, ...args] = process.argv.slice(2);
if (cmd === 'facts') {
  const pkg = readPackage(args[0]);
  const engines = (pkg.engines && pkg.engines.node) || '';
  const hasBuild = pkg.scripts && typeof pkg.scripts.build === 'string';
  process.stdout.write(
    `has_build=${hasBuild ? 'yes' : 'no'}\nengines=${shellQuote(engines)}\nname=${shellQuote(pkg.name || '')}\n`,
  );
} else if (cmd === 'satisfies') {
  const version = parseVersion(args[0]);
  const result = version && satisfies(version, args[1]);
  process.exit(result === true ? 0 : result === false ? 1 : 2);
} else if (cmd === 'launch') {
  const pkg = readPackage(args[0]);
  const web = webCommand(pkg);
  if (web === null) {
    process.stdout.write(
      'node: no start script, no "main" file, no server.js or index.js: the image has no web process\n',
    );
    fs.writeFileSync(args[1], '');
  } else {
    process.stdout.write(`node: process web: ${web.command.join(' ')} (from ${web.why})\n`);
    const list = web.command.map(tomlString).join(', ');
    fs.writeFileSync(args[1], `[[processes]]\ntype = "web"\ncommand = [${list}]\ndefault = true\n`);
  }
} else {
  fail(`usage: package.js facts|satisfies|launch ...`);
}
