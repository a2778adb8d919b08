"""TF Serving configuration and clients for tf-limaml exports.

`serving.client` holds a gRPC client (`GrpcClient`, through
`tensorflow_serving.apis`) and a REST client (`RestClient`) for the
`serving_default` and `adapt_and_predict` signatures. `models.config` and
`batching_parameters.txt` in this directory are example TF Serving configs.
"""
