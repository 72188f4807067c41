// Copied to dist/ by the build script; answers on $PORT.
const http = require('http');
const ms = require('ms');

const port = Number(process.env.PORT || 3000);
http
  .createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end(`made by the __BUILT_AT__; a day is ${ms('1d')} ms\n`);
  })
  .listen(port, () => console.log(`listening on ${port}`));
