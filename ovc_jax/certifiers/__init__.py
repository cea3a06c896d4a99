"""The four certifiers, each its own module, sharing one sampler and one set of bounds.

  standard      Cohen et al.'s CERTIFY and PREDICT (the baseline, "standard RS")
  modified_irs  Modified-IRS: reuse a known prompt's certificate when a novel
                prompt agrees with it on the same noise
  cached_ovc    Cached-OVC: certify from cached noisy embeddings (exact)
  mvn_ovc       MVN-OVC: certify from a Gaussian fit of those embeddings
                (approximate, not a certificate)
"""
