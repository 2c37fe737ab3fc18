"""autograd Functions whose forward is torch's and whose saved activations are compressed."""
