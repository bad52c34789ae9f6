"""The admin panel (QUILL_WEB_PORT, `quill web`): server-rendered pages over the bot's database.

This package's own modules hold no framework import at the top (`bot.web.pages` is what plugins
see through bot.api); the ASGI app lives in `bot.web.app`, the server in `bot.web.server`.
"""
