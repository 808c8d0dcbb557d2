"""A plugin package holding a domain a third party could have written."""
