"""The web console: a browser UI served by `sorai serve` at `/`, over the public API and the
small /v1/sorai/... endpoints it adds (indexes, eval runs, training runs, agent runs).

`sorai.console.app.install(app, ConsoleSettings(...))` adds it to a server app; importing this
package alone is cheap (the `sorai serve` flags live in command.py)."""
