"""modelpress API service. Knows about uploads, jobs and storage; never about tensors."""
