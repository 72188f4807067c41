// Edited by the benchmark's one-file rebuild.
exports.greeting = () => 'hello from express';
