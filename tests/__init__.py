"""Tests for twisted_relay."""
