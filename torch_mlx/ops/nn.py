"""Neural-network ops: softmax, log_softmax, layer/rms/group norm, conv, pooling, activations, dropout, scaled_dot_product_attention, losses."""
