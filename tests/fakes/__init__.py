"""Third-party services as real local servers speaking their wire formats."""
