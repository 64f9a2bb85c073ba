"""Code shared by the four hasoffers-kpi services: settings, schema, event contracts, the bus."""
