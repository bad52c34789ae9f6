"""Transports: each turns its own events into `Request`s for the router and renders `Reply`s."""
