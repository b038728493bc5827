"""Funnels, retention and active users: definitions, the person state, and partition partials."""
