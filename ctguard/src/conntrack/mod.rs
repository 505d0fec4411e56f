//! Reading conntrack's own view of a namespace: /proc/net/stat/nf_conntrack,
//! the nf_conntrack sysctls and the slab object size.
