// Command gitops-health reads Kubernetes objects (a JSON array on standard
// input) and prints, for each, the health that Flux and Argo CD would give it:
// kstatus's Compute (the library behind Flux's health checks) and an Argo CD
// Lua health script run in gopher-lua with the libraries Argo CD opens.
// The pytest in e2e/tests/test_gitops_health.py feeds it DerpRegions whose
// status the operator's own status code computed.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// Verdict is one object's health by both tools.
type Verdict struct {
	Name           string `json:"name"`
	KStatus        string `json:"kstatus"`
	KStatusMessage string `json:"kstatusMessage"`
	Argo           string `json:"argo"`
	ArgoMessage    string `json:"argoMessage"`
}

func main() {
	script := flag.String("argo-health", "", "the Argo CD health Lua script")
	flag.Parse()
	source, err := os.ReadFile(*script)
	if err != nil {
		fail("reading the Argo CD health script: %v", err)
	}
	var raws []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&raws); err != nil {
		fail("reading objects from standard input: %v", err)
	}
	verdicts := make([]Verdict, 0, len(raws))
	for _, raw := range raws {
		// Decoded as the API machinery does, with whole numbers as int64.
		var object map[string]any
		if err := utiljson.Unmarshal(raw, &object); err != nil {
			fail("decoding an object: %v", err)
		}
		u := &unstructured.Unstructured{Object: object}
		computed, err := status.Compute(u)
		if err != nil {
			fail("kstatus on %s: %v", u.GetName(), err)
		}
		argo, message, err := argoHealth(string(source), object)
		if err != nil {
			fail("Argo CD health script on %s: %v", u.GetName(), err)
		}
		verdicts = append(verdicts, Verdict{u.GetName(), string(computed.Status), computed.Message, argo, message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(verdicts); err != nil {
		fail("writing verdicts: %v", err)
	}
}

// argoHealth runs the script as Argo CD does: a fresh state with only the
// base, table, string and math libraries, the object as the global obj, and
// a returned table whose status and message fields are the verdict.
func argoHealth(source string, object map[string]any) (string, string, error) {
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		state.Push(state.NewFunction(lib.open))
		state.Push(lua.LString(lib.name))
		state.Call(1, 0)
	}
	state.SetGlobal("obj", toLua(state, object))
	if err := state.DoString(source); err != nil {
		return "", "", err
	}
	result, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("the script returned %s, not a table", state.Get(-1).Type())
	}
	return lua.LVAsString(result.RawGetString("status")), lua.LVAsString(result.RawGetString("message")), nil
}

// toLua converts a decoded object into Lua values: objects and arrays become
// tables (arrays indexed from 1), JSON null becomes nil.
func toLua(state *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case map[string]any:
		table := state.NewTable()
		for key, item := range v {
			table.RawSetString(key, toLua(state, item))
		}
		return table
	case []any:
		table := state.NewTable()
		for _, item := range v {
			table.Append(toLua(state, item))
		}
		return table
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gitops-health: "+format+"\n", args...)
	os.Exit(1)
}
