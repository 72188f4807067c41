// The build step: needs a devDependency, writes the server the start script runs.
const fs = require('fs');
const pc = require('picocolors');

fs.mkdirSync('dist', { recursive: true });
fs.writeFileSync(
  'dist/server.js',
  fs.readFileSync('src/server.js', 'utf8').replace('__BUILT_AT__', 'build script'),
);
console.log(pc.green('built dist/server.js'));
