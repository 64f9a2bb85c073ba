"""A fake HasOffers Network API v3: a real local HTTP server for tests and the demo."""
