"""Built-in plugins: one module per plugin, each found by `bot.plugins`."""
