"""The Discord transport: a discord.py `AutoShardedClient` that feeds the router and renders its
replies. One client class, `QuillClient`, made of one part per concern:

- `base.py`: the client bound to a quill core (intents, no pings, the command tree);
- `delivery.py`: posting replies (streamed edits, splitting, embeds, files, retries);
- `admin.py`: admins, help channels (`DiscordGuild`), /help and the /quill admin group;
- `slash.py`: the plugins' commands as slash commands, and running them;
- `events.py`: messages, edits, deletions and reactions;
- `client.py`: `QuillClient` itself and start-up (`make_client`, `run_discord`).
"""

from bot.transports.discord.admin import DiscordGuild
from bot.transports.discord.client import DiscordStartError, QuillClient, make_client, run_discord

__all__ = ["DiscordGuild", "DiscordStartError", "QuillClient", "make_client", "run_discord"]
