// The test node's own small images: the pod sandbox's process and a test server.
// No dependencies: both build as static binaries from the standard library.
module derpfleet.test/e2e/cluster/images

go 1.26.0
