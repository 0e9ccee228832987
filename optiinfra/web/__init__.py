"""HTTP plumbing every capability shares: requests, errors, bodies, drain."""
