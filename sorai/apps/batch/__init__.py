"""`sorai batch`: submit, follow, cancel and read batches on a running server."""
