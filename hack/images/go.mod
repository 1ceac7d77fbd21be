// The node's two helper images (hack/build-image.sh): the pod sandbox's pause process and
// the stand-in database of DatabaseCluster pods. Standard library only.
module shardop.dev/hack/images

go 1.24
