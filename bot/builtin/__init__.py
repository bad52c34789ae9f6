"""Built-in plugins that are core features: data controls (privacy), fine-tuning and the
language of a channel.

They are plugins like those in `plugins/` (hooks and commands, loaded by `bot.plugins`), but
they belong to the core and may use its internals (the tables, the memory repository). No other
module of `bot/` imports them.
"""
