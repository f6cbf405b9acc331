"""relay: an aliasing mail proxy for online marketplaces."""

__version__ = "0.1.0"
