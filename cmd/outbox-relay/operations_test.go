package main

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// The shipped alert rules and dashboard name only metrics the relay exports.
func TestOperations_MetricNamesExist(t *testing.T) {
	e := newEnv(t)
	stop, log := inProcess(t, e.args())
	base := httpAddrOf(t, log)
	waitStreaming(t, e.pg, "outbox_relay")
	insertGapEvents(t, e.pg, "one", 1)
	waitStream(t, e.nats.URL, 1, 30*time.Second)
	_, m := testenv.HTTPGet(t, base+"/metrics")
	require.NoError(t, stop())
	exported := map[string]bool{}
	for _, line := range strings.Split(m, "\n") {
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			exported[f[2]] = true
			if f[3] == "histogram" {
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					exported[f[2]+s] = true
				}
			}
		}
	}

	var rules struct {
		Groups []struct {
			Name  string
			Rules []struct {
				Alert, Expr string
				Labels      map[string]string
			}
		}
	}
	b, err := os.ReadFile("../../docs/operations/alerts.yml")
	require.NoError(t, err)
	require.NoError(t, yaml.Unmarshal(b, &rules))
	require.NotEmpty(t, rules.Groups)
	var exprs []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			require.NotEmpty(t, r.Alert)
			require.NotEmpty(t, r.Expr, r.Alert)
			require.NotEmpty(t, r.Labels["severity"], r.Alert)
			exprs = append(exprs, r.Expr)
		}
	}

	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	b, err = os.ReadFile("../../docs/operations/grafana-dashboard.json")
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &dash))
	require.NotEmpty(t, dash.Panels)
	for _, p := range dash.Panels {
		require.NotEmpty(t, p.Targets, p.Title)
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}

	names := regexp.MustCompile(`outbox_relay_[a-z_]+`)
	used := 0
	for _, x := range exprs {
		for _, n := range names.FindAllString(x, -1) {
			used++
			require.True(t, exported[n], "%s (in %q) is not a metric the relay exports", n, x)
		}
	}
	require.Greater(t, used, 10)
}
