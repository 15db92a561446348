//go:build tools

// Package tools pins the tools' modules; build.sh builds their commands.
package tools

import (
	_ "helm.sh/helm/v3/pkg/action"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
)
