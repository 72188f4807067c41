// Answers on $PORT, as the buildpack's process is told to.
const express = require('express');
const { greeting } = require('./greeting');

const app = express();
app.get('/', (req, res) => {
  res.type('text/plain').send(`${greeting()} (NODE_ENV=${process.env.NODE_ENV})\n`);
});
const port = Number(process.env.PORT || 3000);
app.listen(port, () => console.log(`listening on ${port}`));
