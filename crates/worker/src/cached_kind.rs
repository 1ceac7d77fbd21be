//! The `Resource` of a cached form of a kind ([`crate::cluster_cache::CachedCluster`]): the
//! kind's own group, version and names, so the store, owner references and the
//! controller's queue see the kind, and the form's own (partial) metadata.

/// Implements `kube::Resource` for a cached form with a `metadata: ObjectMeta` field, as
/// the kind it caches: `impl_resource_as!(impl<K: Bound> for Form<K> as K)` or
/// `impl_resource_as!(impl for Form as Kind)`.
macro_rules! impl_resource_as {
    (impl $(<$generic:ident: $bound:path>)? for $form:ty as $kind:ty) => {
        impl $(<$generic: $bound>)? kube::Resource for $form {
            type DynamicType = ();
            type Scope = <$kind as kube::Resource>::Scope;

            fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
                <$kind as kube::Resource>::kind(dt)
            }

            fn group(dt: &()) -> std::borrow::Cow<'_, str> {
                <$kind as kube::Resource>::group(dt)
            }

            fn version(dt: &()) -> std::borrow::Cow<'_, str> {
                <$kind as kube::Resource>::version(dt)
            }

            fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
                <$kind as kube::Resource>::plural(dt)
            }

            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }

            fn meta_mut(
                &mut self,
            ) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

pub(crate) use impl_resource_as;
