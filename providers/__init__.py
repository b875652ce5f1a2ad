"""Image providers: one Protocol, one adapter per upstream."""
