"""Pipeline templates that several pipelines instantiate; none is a pipeline of its own."""
