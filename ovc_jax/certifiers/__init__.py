"""The four certifiers, each its own module, sharing one sampler and one set of bounds.

  standard      Cohen et al.'s CERTIFY and PREDICT (the baseline, "standard RS")
  modified_irs  Modified-IRS: reuse a known prompt's certificate when a novel
                prompt agrees with it on the same noise
  cached_ovc    Cached-OVC: certify from cached noisy embeddings (exact)
  mvn_ovc       MVN-OVC: certify from a Gaussian fit of those embeddings
                (approximate, not a certificate)
  core          the traceable core: their counts and certificates as pure
                JAX functions to jit, vmap and shard (docs/JAX.md)

One calling convention for all four: the key first (where one is taken),
then what is certified (classifier, params and input; or a cache or a fit,
then a class matrix), then `SmoothingParams`, then the method's own
parameter object (`IRSParams`, `CachedParams`, `MVNParams`); execution
options (num_classes, mesh) are keywords:

  standard.certify(key, apply_fn, params, x, smoothing)
  modified_irs.certify_novel(key, apply_fn, params, x, known, smoothing, irs)
  cached_ovc.certify_cached(cache, class_embeddings, smoothing, cached)
  mvn_ovc.certify_mvn(key, fit, class_embeddings, smoothing, mvn)
"""
